"""Per-epoch logging of CAML's loss terms, ramp-up weights and memory bank fill, drawn into ``progress.png``.

nnU-Net's ``LocalLogger`` only accepts keys it knows and draws its own three panels. :class:`CAMLLocalLogger`
registers CAML's keys and draws nnU-Net's figure unchanged with CAML's panels underneath, in the same
``progress.png``.
"""
import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
from batchgenerators.utilities.file_and_folder_operations import join  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402

#: key -> legend label of the per-epoch values CAML logs (means over the epoch's training steps)
CAML_LOSS_KEYS = {
    "caml_loss_sup_main": "L_sup main",
    "caml_loss_sup_aux": "L_sup aux",
    "caml_loss_consistency": "L_c (mutual consistency)",
    "caml_loss_occ": "L_o (omni-correlation)",
}
CAML_WEIGHT_KEYS = {"caml_lambda_c": "lambda_c", "caml_lambda_o": "lambda_o"}
CAML_MEMORY_KEY = "caml_memory_bank_fill"


class CAMLLocalLogger(LocalLogger):
    """nnU-Net's local logger plus CAML's keys; ``progress.png`` gets two more panels."""

    def __init__(self, verbose: bool = False):
        super().__init__(verbose)
        for key in (*CAML_LOSS_KEYS, *CAML_WEIGHT_KEYS, CAML_MEMORY_KEY):
            self.my_fantastic_logging[key] = []

    def plot_progress_png(self, output_folder):
        epochs = min(len(v) for v in self.my_fantastic_logging.values())
        if epochs == 0:
            return
        # nnU-Net's own figure, read back and placed on top of CAML's panels
        super().plot_progress_png(output_folder)
        nnunet_figure = plt.imread(join(output_folder, "progress.png"))
        log = self.my_fantastic_logging
        x = list(range(epochs))
        fig, axes = plt.subplots(3, 1, figsize=(30, 84), gridspec_kw={"height_ratios": [54, 15, 15]})
        axes[0].imshow(nnunet_figure)
        axes[0].axis("off")

        ax = axes[1]
        for key, label in CAML_LOSS_KEYS.items():
            ax.plot(x, log[key][:epochs], ls="-", label=label, linewidth=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel("CAML loss terms")
        ax.legend(loc=(0, 1), ncol=4)

        ax = axes[2]
        for key, label in CAML_WEIGHT_KEYS.items():
            ax.plot(x, log[key][:epochs], ls="-", label=label, linewidth=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel("ramp-up weight")
        ax.legend(loc=(0, 1), ncol=2)
        ax2 = ax.twinx()
        ax2.plot(x, log[CAML_MEMORY_KEY][:epochs], color="k", ls="--", label="memory bank entries", linewidth=3)
        ax2.set_ylabel("memory bank entries")
        ax2.legend(loc=(0.4, 1))

        plt.tight_layout()
        fig.savefig(join(output_folder, "progress.png"))
        plt.close(fig)
