"""SYNTHIA -> Cityscapes: score the target once, tune the adaptation with Ray Tune, log to
MLflow. The Cityscapes target is scored on SYNTHIA's 16 and 13 classes.

With no dataset given, the pipeline runs on the built-in synthetic benchmark (as
tune_gta.py does). With real data, give a SYNTHIA-trained source checkpoint over the 19
Cityscapes train ids (`sfda-ray train-source` on SYNTHIA; public 16-class checkpoints are
refused) and a config whose `data:` section names Cityscapes (root, eval_classes):

    python experiments/tune_synthia.py --checkpoint synthia_source.pt \
        --config experiments/configs/synthia_cityscapes.yaml
"""

import sys

from sfda_ray.dist.job import main

if __name__ == "__main__":
    sys.exit(main("synthia_cityscapes", "outputs/tune_synthia", __doc__.split("\n\n")[0]))
