"""Recipes: each module's `get_config()` starts from `transformer.config.get_config()` and
only sets values. `--config NAME` on the command line names one of them (see
`transformer.cli.recipe_path`), or a recipe file's path."""
