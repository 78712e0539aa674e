"""``progress.png`` of a CAML run: nnU-Net's figure, unchanged, with CAML's two panels underneath."""
import numpy as np
from nnunetv2.training.logging.nnunet_logger import LocalLogger
from PIL import Image

from nnunetv2_caml.progress import CAMLLocalLogger


def _log_epochs(logger, values: dict, epochs: int) -> None:
    for epoch in range(epochs):
        for key in logger.my_fantastic_logging:
            logger.log(key, values[key][epoch], epoch)


def test_caml_panels_stand_under_nnunets_unchanged_figure(tmp_path):
    rng = np.random.default_rng(0)
    caml = CAMLLocalLogger()
    values = {key: rng.random(3) for key in caml.my_fantastic_logging}
    values["epoch_start_timestamps"] = 1000.0 + 10 * np.arange(3)
    values["epoch_end_timestamps"] = values["epoch_start_timestamps"] + 2
    _log_epochs(caml, values, 3)
    nnunet = LocalLogger()  # nnU-Net's own logger with the same values of its keys
    _log_epochs(nnunet, values, 3)
    (tmp_path / "caml").mkdir()
    (tmp_path / "nnunet").mkdir()
    caml.plot_progress_png(str(tmp_path / "caml"))
    nnunet.plot_progress_png(str(tmp_path / "nnunet"))
    combined = np.asarray(Image.open(tmp_path / "caml" / "progress.png").convert("RGB"))
    alone = np.asarray(Image.open(tmp_path / "nnunet" / "progress.png").convert("RGB"))
    assert combined.shape[1] == alone.shape[1] and combined.shape[0] > alone.shape[0] * 1.4
    np.testing.assert_array_equal(combined[:alone.shape[0]], alone)  # pixel for pixel what nnU-Net draws
    caml_panels = combined[alone.shape[0]:]
    assert (caml_panels < 200).any(-1).mean() > 0.005  # curves, axes and labels: not a blank strip


def test_nothing_is_drawn_before_the_first_epoch(tmp_path):
    CAMLLocalLogger().plot_progress_png(str(tmp_path))
    assert not (tmp_path / "progress.png").exists()
