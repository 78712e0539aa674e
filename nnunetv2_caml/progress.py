"""Per-epoch logging of CAML's loss terms, ramp-up weights and memory bank fill, drawn into ``progress.png``.

nnU-Net's ``LocalLogger`` only accepts keys it knows and draws its own three panels. :class:`CAMLLocalLogger`
registers CAML's keys and stacks two panels of CAML curves under nnU-Net's unchanged figure, in the same
``progress.png``.
"""
import zlib

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
from PIL import Image  # noqa: E402
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
        super().plot_progress_png(output_folder)  # nnU-Net's figure, exactly as nnU-Net draws it
        log = self.my_fantastic_logging
        x = list(range(epochs))
        sns.set(font_scale=2.5)
        fig, axes = plt.subplots(2, 1, figsize=(30, 30))
        for ax, keys, ylabel in ((axes[0], CAML_LOSS_KEYS, "CAML loss terms"),
                                 (axes[1], CAML_WEIGHT_KEYS, "ramp-up weight")):
            for key, label in keys.items():
                ax.plot(x, log[key][:epochs], ls="-", label=label, linewidth=4)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.legend(loc=(0, 1), ncol=len(keys))
        ax2 = axes[1].twinx()  # the memory bank fill beside the ramp-up weights
        ax2.plot(x, log[CAML_MEMORY_KEY][:epochs], color="k", ls="--", label="memory bank entries", linewidth=3)
        ax2.set_ylabel("memory bank entries")
        ax2.legend(loc=(0.4, 1))
        plt.tight_layout()
        fig.canvas.draw()
        caml_panels = np.asarray(fig.canvas.buffer_rgba())[..., :3]  # the pixels, never encoded as a PNG
        plt.close(fig)

        # stack CAML's panels under nnU-Net's figure, in the same progress.png: pasting pixels is far cheaper than
        # drawing nnU-Net's figure into ours; one decode of nnU-Net's PNG and one encode of the result
        path = join(output_folder, "progress.png")
        with Image.open(path) as nnunet_figure:
            nnunet_panels = np.asarray(nnunet_figure.convert("RGB"))
        width = max(nnunet_panels.shape[1], caml_panels.shape[1])
        combined = np.full((nnunet_panels.shape[0] + caml_panels.shape[0], width, 3), 255, dtype=np.uint8)
        combined[:nnunet_panels.shape[0], :nnunet_panels.shape[1]] = nnunet_panels
        combined[nnunet_panels.shape[0]:, :caml_panels.shape[1]] = caml_panels
        Image.fromarray(combined).save(path, compress_level=1, compress_type=zlib.Z_RLE)  # plots: long runs of a colour
