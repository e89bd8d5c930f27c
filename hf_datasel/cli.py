"""`hf-datasel`: the command line, one subcommand per step of the flow."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="hf-datasel",
    help="Instruction-tuning data selection for Hugging Face training runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Record → select → train: data selection for Hugging Face training runs."""


@app.command()
def demo(
    output_dir: str = typer.Option("runs/demo", help="Where the runs, the store and results.json go."),
    pool_size: int = typer.Option(2000, min=50, help="Rows in the synthetic pool."),
    budget: float = typer.Option(0.2, min=0.0, max=1.0, help="Fraction of the pool to select."),
    large_steps: int = typer.Option(300, min=1, help="Training steps of the large model on each subset."),
    seed: int = typer.Option(0),
) -> None:
    """Record with a tiny proxy model, select 20 % with S2L and at random, train a larger model on each."""
    from .demo import DemoConfig, run_demo

    run_demo(DemoConfig(output_dir=output_dir, pool_size=pool_size, budget=budget, large_steps=large_steps, seed=seed))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
