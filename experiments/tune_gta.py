"""GTA5 -> Cityscapes: score the target once, tune the adaptation with Ray Tune, log to MLflow.

With no dataset given, the whole pipeline runs on the built-in synthetic benchmark
(generated, with its source model, under --out and cached), on any machine:

    python experiments/tune_gta.py [--out outputs/tune_gta] [--smoke]

With real data, give the GTA5-trained source checkpoint and a config whose `data:`
section names the Cityscapes root (or --data: a dataset YAML or a Parquet manifest); a
public AdaptSegNet/ADVENT .pth is converted once with `sfda-ray import-checkpoint`:

    python experiments/tune_gta.py --checkpoint gta5_source.pt \
        --config experiments/configs/gta5_cityscapes.yaml

The search space is sfda_ray/dist/tune_space.yaml (or --space). Rerunning the same
command resumes an interrupted sweep. It ends by printing the best configuration, its
target mIoU next to the source-only model's, and the `mlflow ui` command for the runs.
"""

import sys

from sfda_ray.dist.job import main

if __name__ == "__main__":
    sys.exit(main("gta5_cityscapes", "outputs/tune_gta", __doc__.split("\n\n")[0]))
