"""SLiM compression + Lightning fine-tuning of the adapters: ``python train.py +peft=true``."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from slim_lightning.device import set_omp_wait_policy

    # before anything loads torch: its OpenMP runtime reads the policy once, at load
    set_omp_wait_policy(cfg.get("engine", {}).get("omp_wait"))
    from slim_lightning.app.train_run import run_train

    run_train(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
