"""The training and evaluation loops. No typer, no rich: progress goes through a Reporter."""
