"""OCC's gathering of voxel features (``nnunetv2_caml.occ``)."""
import torch

from nnunetv2_caml.occ import gather_voxels


def test_gather_voxels_picks_the_rows_of_the_batch_major_voxel_matrix():
    torch.manual_seed(0)
    features = torch.randn(3, 5, 4, 6, 7)
    as_rows = features.movedim(1, -1).reshape(-1, 5)  # one row per voxel, batch-major
    index = torch.randint(0, as_rows.shape[0], (50,))
    assert torch.equal(gather_voxels(features, index), as_rows[index])
    # a gradient reaches exactly the gathered voxels
    features.requires_grad_(True)
    gather_voxels(features, index[:1]).sum().backward()
    b, v = divmod(int(index[0]), 4 * 6 * 7)
    assert torch.equal(features.grad.flatten(2)[b, :, v], torch.ones(5))
    assert features.grad.abs().sum() == 5
