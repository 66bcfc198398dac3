"""The shapes world and its toy model, in one room (docs/shapes_world.md):

- the shipped pipeline, the diffusers folders here (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
  scheduler/), which every script loads with `--model toy`;
- world.py: the world's colours, shapes and sizes, its renderer, its pixel detector and the rewards built on it
  (`--reward shape_area`, `shapes_alignment`, `shapes_correct`);
- make.py: trains the pipeline on the rendered world (`python -m toy_model.make`);
- measure.py: a run's shape area and prompt alignment (and KL) on noise held apart from training, as the tests,
  benchmarks, notebooks and the exercises' grader measure them.
"""
