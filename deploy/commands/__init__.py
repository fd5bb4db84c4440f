"""One module per stage, each with ``register(app)``; module tops import only typer + stdlib."""
