"""`hf-datasel bench quality|perf`: the benchmark commands, as a typer sub-app.

The main CLI mounts it with `app.add_typer(bench_app, name="bench")`.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

bench_app = typer.Typer(
    name="bench",
    help="Benchmarks: does the selection work (quality), and how fast (perf).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@bench_app.command()
def quality(
    mode: str = typer.Option(
        "quick", help="quick (3 seeds, own + unseen pools, ~31 min on 2 CPU cores) or full (5 seeds, larger)."
    ),
    seeds: Annotated[
        list[int] | None, typer.Option("--seed", help="Seeds to run (repeat the option); default by mode.")
    ] = None,
    variants: Annotated[
        list[str] | None, typer.Option("--variant", help="Methods to run (repeat); default: random, s2l, less, g2is.")
    ] = None,
    protocols: Annotated[
        list[str] | None, typer.Option("--protocol", help="steps (equal steps) and/or epochs (fixed epochs).")
    ] = None,
    large_steps: int = typer.Option(None, min=1, help="Fine-tuning steps of the large model per subset (steps)."),
    workers: int = typer.Option(None, min=1, help="Single-thread worker processes (default 2)."),
    pool_size: int = typer.Option(None, min=20, help="Rows in the synthetic pool."),
    output_dir: str = typer.Option(None, help="Where the recorded runs go (default runs/bench/quality)."),
    results_dir: str = typer.Option("docs/bench", help="Where quality.json, quality.png and quality.md go."),
    unseen: bool = typer.Option(True, help="Also run the unseen pool family (never used to choose a setting)."),
    family: str = typer.Option("bench", help="Pool family the settings run on (bench, unseen, heldout)."),
    unseen_family: str = typer.Option("unseen", help="Pool family checked on other seeds."),
) -> None:
    """Fine-tune a pretrained larger model on each method's 1-30 % subsets, the oracle and the full pool."""
    from ..synthetic.mix import FAMILIES
    from .quality import PROTOCOLS, QualityConfig, markdown_table, run_quality

    for hint, name in (("--family", family), ("--unseen-family", unseen_family)):
        if name not in FAMILIES:
            raise typer.BadParameter(f"pool families are {sorted(FAMILIES)}, not {name!r}", param_hint=hint)

    if mode not in ("quick", "full"):
        raise typer.BadParameter("mode must be 'quick' or 'full'", param_hint="--mode")
    if protocols and set(protocols) - set(PROTOCOLS):
        raise typer.BadParameter(f"protocols are {list(PROTOCOLS)}", param_hint="--protocol")
    overrides = {
        "seeds": tuple(seeds) if seeds else None,
        "variants": tuple(variants) if variants else None,
        "protocols": tuple(protocols) if protocols else None,
        "workers": workers,
        "large_steps": large_steps,
        "pool_size": pool_size,
        "output_dir": output_dir,
        "results_dir": results_dir,
        "family": family,
        "unseen": unseen_family if unseen else None,
    }
    config = QualityConfig.for_mode(mode, **{k: v for k, v in overrides.items() if v is not None or k == "unseen"})
    result = run_quality(config)
    typer.echo(markdown_table(result))
    typer.echo(json.dumps(result["goals"], indent=1))


@bench_app.command()
def perf(
    parts: Annotated[
        list[str] | None, typer.Option("--part", help="Parts to run (repeat the option); default: all.")
    ] = None,
    rows: int = typer.Option(1_000_000, min=100, help="Rows for the S2L / LESS / G2IS scoring parts."),
    out: str = typer.Option("docs/bench/perf.json", help="Where the JSON result goes."),
    update: bool = typer.Option(False, help="Replace only the parts run now in an existing --out."),
    device: str = typer.Option(None, help="Featurize parts: cpu or cuda (default: CUDA when available)."),
) -> None:
    """Recorder overhead, featurizer (and its LM head at label positions: lm_head), spectra, S2L/LESS/G2IS at
    scale, and gradient features vs peers (featurize-vs-peers), each as a ratio measured in one run."""
    from .perf import PARTS, PerfConfig, markdown_table, run_perf

    unknown = sorted(set(parts or ()) - set(PARTS))
    if unknown:
        raise typer.BadParameter(f"unknown part(s) {unknown}; choose from {list(PARTS)}", param_hint="--part")
    config = PerfConfig(parts=tuple(parts) if parts else PARTS, rows=rows, device=device)
    result = run_perf(config, out=out, log=typer.echo, update=update)
    typer.echo(markdown_table(result))
