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


def test_occ_loss_and_gradients_equal_the_papers_form_on_the_selected_voxels():
    # OmniCorrelationConsistency computes L_o blockwise (losses.omni_correlation_consistency); the paper's form builds
    # both softmax matrices over the top_k most confident agreeing voxels per class and takes their cross-entropy
    from nnunetv2_caml.losses import (most_confident_per_class, omni_correlation_consistency_loss,
                                      omni_correlation_matrix)
    from nnunetv2_caml.occ import OmniCorrelationConsistency

    torch.manual_seed(0)
    occ = OmniCorrelationConsistency(feature_channels=5, num_classes=3, embedding_dim=8, top_k=40,
                                     memory_per_class=16)
    labeled = torch.randn(2, 5, 6, 6, 6)
    target = torch.randint(0, 3, (2, 6, 6, 6))
    occ.update_memory(labeled, labeled, target, target, target, ["a", "b"])
    features = [torch.randn(2, 5, 6, 6, 6, requires_grad=True) for _ in range(2)]
    probs = [torch.softmax(torch.randn(2, 3, 6, 6, 6), 1) for _ in range(2)]
    probs[1] = (probs[1] + 2 * probs[0]) / 3  # most voxels agree

    torch.manual_seed(1)  # the bank samples its entries
    loss = occ(*features, *probs)
    grads = torch.autograd.grad(loss, features)

    torch.manual_seed(1)
    memory = occ.memory_bank.sample(occ.memory_per_class)
    confidence, label_main = probs[0].max(1)
    agree = (label_main == probs[1].max(1).indices).flatten()
    confidence, label = confidence.flatten()[agree], label_main.flatten()[agree]
    # the heads embed the selected voxels only (their BatchNorm sees those), in the order of the selection
    rows = most_confident_per_class(confidence, label, 3, occ.top_k)
    corr = []
    for f, projection, prediction in ((features[0], occ.projection_main, occ.prediction_main),
                                      (features[1], occ.projection_aux, occ.prediction_aux)):
        embeddings = prediction(projection(f.movedim(1, -1).reshape(-1, 5)[agree][rows]))
        corr.append(omni_correlation_matrix(embeddings, confidence[rows], label[rows], memory, occ.temperature,
                                            occ.top_k))
    assert corr[0].shape[0] == 3 * 40  # every class filled its top_k
    reference = omni_correlation_consistency_loss(corr[1], corr[0])
    torch.testing.assert_close(loss, reference)
    for got, expected in zip(grads, torch.autograd.grad(reference, features)):
        torch.testing.assert_close(got, expected)
