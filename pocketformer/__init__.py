"""pocketformer: compress a pre-trained transformer for a user's data, export it for phones,
and measure it where it runs. Stages: pocketformer.compress -> pocketformer.export ->
pocketformer.runtime_bench, driven by a recipe (pocketformer.recipe, pocketformer.pipeline)."""
__version__ = "0.1.0"
