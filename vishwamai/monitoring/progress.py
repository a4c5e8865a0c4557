"""Console progress bar (rank 0): loss, lr and tokens/s."""

from __future__ import annotations

from vishwamai.train.events import Callback


class ProgressBar(Callback):
    def on_train_start(self, trainer) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=trainer.cfg.training.max_steps, initial=trainer.state.step,
                        disable=not trainer.is_main, dynamic_ncols=True, desc="train")

    def on_step_end(self, trainer) -> None:
        m = trainer.metrics
        postfix = {"loss": f"{m['loss']:.3f}", "lr": f"{m['lr']:.2e}", "tok/s": f"{m['tokens_per_s']:,.0f}"}
        if trainer.state.last_val_loss is not None:
            postfix["val"] = f"{trainer.state.last_val_loss:.3f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def on_train_end(self, trainer) -> None:
        self.bar.close()
