"""Unit tests of nnunetv2_caml.memory_bank.LabeledMemoryBank."""
import pytest
import torch

from nnunetv2_caml.memory_bank import LabeledMemoryBank

D = 3


def _rows(start, n, d=D):
    """``n`` identifiable embeddings: row i is ``[start + i, start + i + 0.5, ...]``."""
    base = torch.arange(start, start + n, dtype=torch.float32)[:, None]
    return base + 0.5 * torch.arange(d, dtype=torch.float32)[None]


def _as_set(t):
    return {tuple(r) for r in t.tolist()}


def test_update_replaces_case_entries():
    bank = LabeledMemoryBank(num_classes=2, embedding_dim=D, entries_per_case=100)
    bank.update("a", _rows(0, 5), torch.tensor([0, 0, 0, 1, 1]))
    assert bank.fill() == [3, 2]
    bank.update("a", _rows(100, 4), torch.tensor([1, 1, 1, 1]))
    assert bank.fill() == [0, 4]  # the second update of "a" replaced, not accumulated
    assert bank.case_ids == ["a"]
    sampled = bank.sample(10)
    assert sampled[0] is None
    assert _as_set(sampled[1]) == _as_set(_rows(100, 4))


def test_fill_counts_over_cases():
    bank = LabeledMemoryBank(num_classes=3, embedding_dim=D, entries_per_case=100)
    assert bank.fill() == [0, 0, 0]
    bank.update("a", _rows(0, 6), torch.tensor([0, 1, 1, 2, 2, 2]))
    bank.update("b", _rows(10, 3), torch.tensor([2, 0, 0]))
    bank.update(7, _rows(20, 1), torch.tensor([1]))  # case ids are stored as strings
    assert bank.fill() == [3, 3, 4]
    assert bank.case_ids == ["7", "a", "b"]


def test_entries_per_case_cap_keeps_subset():
    torch.manual_seed(0)
    bank = LabeledMemoryBank(num_classes=2, embedding_dim=D, entries_per_case=4)
    emb = _rows(0, 13)
    labels = torch.tensor([1] * 10 + [0] * 3)
    bank.update("a", emb, labels)
    assert bank.fill() == [3, 4]  # class 1 capped at 4, class 0 below the cap keeps all 3
    bank.update("b", _rows(50, 6), torch.ones(6, dtype=torch.long))
    assert bank.fill() == [3, 8]  # the cap is per case
    stored_1 = bank.sample(100)[1]
    assert stored_1.shape == (8, D)
    assert len(_as_set(stored_1)) == 8
    from_a = _as_set(stored_1) & _as_set(emb[:10])
    assert len(from_a) == 4 and from_a <= _as_set(emb[:10])
    assert _as_set(stored_1) <= _as_set(emb[:10]) | _as_set(_rows(50, 6))
    assert _as_set(bank.sample(100)[0]) == _as_set(emb[10:])


def test_cap_subset_is_random():
    # the kept subset should not always be the first entries_per_case rows
    kept = set()
    for seed in range(5):
        torch.manual_seed(seed)
        bank = LabeledMemoryBank(num_classes=1, embedding_dim=D, entries_per_case=3)
        bank.update("a", _rows(0, 12), torch.zeros(12, dtype=torch.long))
        kept |= _as_set(bank.sample(100)[0])
    assert len(kept) > 3


def test_sample_draws_distinct_stored_rows():
    torch.manual_seed(1)
    bank = LabeledMemoryBank(num_classes=2, embedding_dim=D, entries_per_case=1000)
    bank.update("a", _rows(0, 30), torch.tensor([0] * 20 + [1] * 10))
    bank.update("b", _rows(100, 25), torch.tensor([0] * 15 + [1] * 10))
    stored = [_as_set(torch.cat([_rows(0, 20), _rows(100, 15)])), _as_set(torch.cat([_rows(20, 10), _rows(115, 10)]))]
    sampled = bank.sample(8)
    assert len(sampled) == 2
    for c in range(2):
        assert sampled[c].shape == (8, D)
        assert sampled[c].dtype == torch.float32
        rows = _as_set(sampled[c])
        assert len(rows) == 8            # without replacement
        assert rows <= stored[c]         # only stored rows of that class


def test_sample_covers_all_stored_entries_across_draws():
    torch.manual_seed(2)
    bank = LabeledMemoryBank(num_classes=1, embedding_dim=D, entries_per_case=1000)
    bank.update("a", _rows(0, 10), torch.zeros(10, dtype=torch.long))
    bank.update("b", _rows(10, 10), torch.zeros(10, dtype=torch.long))
    seen = set()
    for _ in range(40):
        seen |= _as_set(bank.sample(4)[0])
    assert seen == _as_set(_rows(0, 20))  # uniform over all entries, both cases


def test_sample_small_classes():
    bank = LabeledMemoryBank(num_classes=4, embedding_dim=D, entries_per_case=100)
    bank.update("a", _rows(0, 6), torch.tensor([1, 2, 2, 2, 3, 3]))
    sampled = bank.sample(5)
    assert sampled[0] is None                          # no entries
    assert sampled[1] is None                          # a single entry
    assert _as_set(sampled[2]) == _as_set(_rows(1, 3))  # fewer than requested: all of them
    assert sampled[2].shape == (3, D)
    assert _as_set(sampled[3]) == _as_set(_rows(4, 2))
    # a single entry in each of two cases makes two: the class is usable
    bank.update("b", _rows(50, 1), torch.tensor([1]))
    assert _as_set(bank.sample(5)[1]) == {tuple(_rows(0, 1)[0].tolist()), tuple(_rows(50, 1)[0].tolist())}


def test_update_detaches_and_copies_input():
    bank = LabeledMemoryBank(num_classes=1, embedding_dim=D, entries_per_case=100)
    emb = _rows(0, 4).clone().requires_grad_(True)
    bank.update("a", emb, torch.zeros(4, dtype=torch.long))
    out = bank.sample(10)[0]
    assert not out.requires_grad
    with torch.no_grad():
        emb.add_(1000.0)  # the bank must not alias the caller's tensor
    assert _as_set(bank.sample(10)[0]) == _as_set(_rows(0, 4))
    emb64 = _rows(0, 4).double()
    bank.update("b", emb64, torch.zeros(4, dtype=torch.long))
    assert bank.sample(10)[0].dtype == torch.float32


def test_state_dict_round_trip():
    torch.manual_seed(3)
    bank = LabeledMemoryBank(num_classes=3, embedding_dim=D, entries_per_case=5)
    bank.update("a", torch.randn(12, D), torch.randint(0, 3, (12,)))
    bank.update("b", torch.randn(9, D), torch.randint(0, 3, (9,)))
    state = bank.state_dict()
    restored = LabeledMemoryBank(num_classes=3, embedding_dim=D, entries_per_case=99)
    restored.load_state_dict(state)
    assert restored.entries_per_case == 99  # the loading bank's setting stays in force
    assert restored.case_ids == bank.case_ids
    assert restored.fill() == bank.fill()
    state2 = restored.state_dict()
    assert state2.keys() == state.keys()
    for case in ("a", "b"):
        assert len(state2["entries"][case]) == 3
        for t_orig, t_back in zip(state["entries"][case], state2["entries"][case]):
            assert t_back.device.type == "cpu"
            assert torch.equal(t_orig, t_back)
    # the state survives a torch.save / torch.load round trip as well
    import io
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    again = LabeledMemoryBank(num_classes=3, embedding_dim=D, entries_per_case=5)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.fill() == bank.fill()


def test_load_state_dict_with_smaller_cap_keeps_a_subset():
    bank = LabeledMemoryBank(num_classes=2, embedding_dim=D, entries_per_case=10)
    bank.update("a", _rows(0, 8), torch.tensor([0, 1] * 4))
    smaller = LabeledMemoryBank(num_classes=2, embedding_dim=D, entries_per_case=3)
    smaller.load_state_dict(bank.state_dict())
    assert smaller.fill() == [3, 3]
    for kept, stored in zip(smaller.state_dict()["entries"]["a"], bank.state_dict()["entries"]["a"]):
        assert _as_set(kept) <= _as_set(stored)


def test_restore_undoes_updates_since_snapshot():
    torch.manual_seed(0)
    bank = LabeledMemoryBank(num_classes=2, embedding_dim=D, entries_per_case=6)
    bank.update("a", torch.randn(5, D), torch.tensor([0, 1, 0, 1, 0]))
    bank.update("b", torch.randn(4, D), torch.tensor([0, 0, 1, 1]))
    before = bank.state_dict()
    snapshot = bank.snapshot(["a", "c"])  # "c" is new: its update must be forgotten
    bank.update("a", torch.full((3, D), float("nan")), torch.tensor([1, 1, 1]))
    bank.update("c", torch.randn(2, D), torch.tensor([0, 1]))
    bank.restore(snapshot)
    after = bank.state_dict()
    assert bank.case_ids == ["a", "b"] and bank.fill() == [5, 4]
    for case in ("a", "b"):
        for x, y in zip(before["entries"][case], after["entries"][case]):
            assert torch.equal(x, y)
    bank.update("d", torch.randn(2, D), torch.tensor([0, 1]))  # the forgotten row is reused cleanly
    assert bank.case_ids == ["a", "b", "d"] and bank.fill() == [6, 5]


def test_load_state_dict_mismatch_raises():
    bank = LabeledMemoryBank(num_classes=2, embedding_dim=D, entries_per_case=5)
    bank.update("a", _rows(0, 4), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError):
        LabeledMemoryBank(num_classes=2, embedding_dim=D + 1).load_state_dict(bank.state_dict())
    with pytest.raises(ValueError):
        LabeledMemoryBank(num_classes=3, embedding_dim=D).load_state_dict(bank.state_dict())


def test_wrong_shapes_raise():
    bank = LabeledMemoryBank(num_classes=2, embedding_dim=D)
    with pytest.raises(ValueError):
        bank.update("a", torch.zeros(4), torch.zeros(4, dtype=torch.long))           # 1D embeddings
    with pytest.raises(ValueError):
        bank.update("a", torch.zeros(4, D + 1), torch.zeros(4, dtype=torch.long))    # wrong D
    with pytest.raises(ValueError):
        bank.update("a", torch.zeros(4, D), torch.zeros(3, dtype=torch.long))        # label count
    with pytest.raises(ValueError):
        bank.update("a", torch.zeros(4, D), torch.zeros(4, 1, dtype=torch.long))    # label shape
    with pytest.raises(ValueError):
        bank.update("a", torch.zeros(2, 4, D), torch.zeros(2, 4, dtype=torch.long))  # 3D embeddings
    assert bank.fill() == [0, 0]  # failed updates store nothing
    with pytest.raises(ValueError):
        LabeledMemoryBank(num_classes=0, embedding_dim=D)
    with pytest.raises(ValueError):
        LabeledMemoryBank(num_classes=2, embedding_dim=D, entries_per_case=0)


def test_indices_to_store_caps_per_class_and_drops_unknown_labels():
    torch.manual_seed(4)
    bank = LabeledMemoryBank(num_classes=2, embedding_dim=D, entries_per_case=3)
    labels = torch.tensor([0, 1, 1, 5, 1, 1, 0, -1, 1])
    keep = bank.indices_to_store(labels)
    kept = keep.tolist()
    assert len(set(kept)) == len(kept)                      # no index twice
    assert sorted(i for i in kept if labels[i] == 0) == [0, 6]  # below the cap: all of class 0
    assert len([i for i in kept if labels[i] == 1]) == 3    # class 1 capped
    assert all(int(labels[i]) in (0, 1) for i in kept)      # labels 5 and -1 dropped
    # and update stores exactly that: labels outside the classes are ignored
    bank.update("a", _rows(0, 9), labels)
    assert bank.fill() == [2, 3]
