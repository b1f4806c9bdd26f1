"""Run ffsd: ``python launch.py [group=option ...] [key=value ...]``; ``-m`` for sweeps.

Examples::

    python launch.py experiment=quickstart
    python launch.py model=wrn40_2 dataset=cifar100
    python launch.py -m distill.lambda_fusion=1,10,100 trainer.seed=0,1,2
"""

from __future__ import annotations

import hydra
from hydra.utils import call
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return call(cfg.task, cfg)


if __name__ == "__main__":
    main()
