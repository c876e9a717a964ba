"""Teacher-feature cache: the student sees exactly the cached view; cached loss == live loss."""

from __future__ import annotations

import timm
import torch

from spkd.models.methods import Distiller
from spkd.models.methods.kd import KD
from spkd.models.methods.sp import SP
from spkd.models.networks.features import FeatureTap
from spkd.models.training import teacher_cache as tc
from tests.models.helpers import normalize, train_source

CPU = torch.device("cpu")
T_MEAN, T_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
S_MEAN, S_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # a student with its own normalisation


def _models():
    torch.manual_seed(0)
    teacher = timm.create_model("test_resnet", pretrained=False, num_classes=2).eval()
    student = timm.create_model("test_efficientnet", pretrained=False, num_classes=2).eval()
    return FeatureTap(teacher, ["auto"]), FeatureTap(student, ["auto"])


def _live(teacher_tap):
    """The live teacher as the cache builder sees it: uint8 view -> (logits, features)."""

    def run(x: torch.Tensor):
        out = teacher_tap(normalize(x, T_MEAN, T_STD))
        return out.logits, out.features

    return run


def _source(train_images, batch_size=5):
    paths, labels = train_images
    source, _ = train_source(paths, labels, 64, batch_size, CPU, seed=1, workers=2)
    return source


def test_cache_reproduces_exactly_the_view_the_teacher_saw(train_images):
    teacher_tap, _ = _models()
    source = _source(train_images, batch_size=4)  # 16 images: no short last batch to drop
    live = _live(teacher_tap)
    shown: list[torch.Tensor] = []  # every uint8 input the teacher got while building

    def recording(x):
        shown.append(x.clone())
        return live(x)

    cache = tc.TeacherCache.build(source, recording, views=3, batch_size=7, seed=5, dtype=torch.float32)
    assert cache.features[0].shape[:2] == (3, len(source.store)) and cache.logits.shape == (3, 16, 2)
    teacher_inputs = torch.cat(shown).view(3, 16, *shown[0].shape[1:])  # built view by view, in order
    seen = []
    for epoch in range(3):
        for batch in cache.epoch(epoch):
            vids = cache.view_ids(epoch)[batch.indices]
            # Bit-identical student input: the very pixels the teacher features were computed on.
            assert torch.equal(batch.images, teacher_inputs[vids, batch.indices])
            # Recomputing the teacher on the reproduced view gives the stored outputs (up to the
            # float reordering a different batch composition causes in the head's matmul).
            logits, feats = live(batch.images)
            c_logits, c_feats = cache(None, batch.indices)
            assert torch.allclose(feats[0], c_feats[0], atol=1e-5)
            assert torch.allclose(logits, c_logits, atol=1e-5)
            seen += [(int(i), int(v)) for i, v in zip(batch.indices, vids, strict=True)]
    # Three epochs over three views: every (image, view) exactly once, no repeats.
    assert sorted(seen) == [(i, v) for i in range(16) for v in range(3)]
    # Views really differ from each other.
    idx = torch.arange(4)
    first, second = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    assert not torch.equal(cache.reproduce(idx, first), cache.reproduce(idx, second))


def test_cached_distillation_loss_equals_live_loss(train_images):
    teacher_tap, student_tap = _models()
    source = _source(train_images, batch_size=8)
    live = _live(teacher_tap)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        cache = tc.TeacherCache.build(source, live, views=2, seed=0, dtype=dtype)
        live_fn = lambda x_t, _idx: live(x_t)  # noqa: E731  (engine TeacherFn signature)
        uncached = Distiller(student_tap, live_fn, [SP(weight=3000.0), KD(1.0, 4.0)])
        cached = Distiller(student_tap, cache, [SP(weight=3000.0), KD(1.0, 4.0)])
        for batch in cache.epoch(1):
            x_s = normalize(batch.images, S_MEAN, S_STD)
            with torch.no_grad():
                _, ref = uncached(x_s, batch.images, batch.labels, batch.indices)
                _, got = cached(x_s, None, batch.labels, batch.indices)
            assert ref.keys() == got.keys() == {"ce", "sp", "kd"}
            assert ref["sp"] > 0
            for key in ref:
                same = torch.allclose(ref[key], got[key], rtol=tol, atol=1e-6)
                assert same, (dtype, key, ref[key], got[key])


def test_cache_size_estimate_and_decision(train_images):
    teacher_tap, _ = _models()
    source = _source(train_images)
    live = _live(teacher_tap)
    shapes, logit_dim = tc.probe_teacher(live, source)
    numel = sum(int(torch.Size(s).numel()) for s in shapes) + logit_dim
    need = tc.cache_bytes(16, 4, numel, bytes_per_value=2)
    cache = tc.TeacherCache.build(source, live, views=4, dtype=torch.bfloat16)
    payload = sum(f.numel() * 2 for f in cache.features) + cache.logits.numel() * 2
    assert payload <= need <= cache.nbytes + 16 * 4 * 20  # estimate within the view-parameter overhead
    assert tc.decide("off", need, CPU).use is False
    assert tc.decide("auto", need, CPU, gpu_budget=0, host_budget=need).placement == "host"
    small = tc.decide("auto", need, CPU, gpu_budget=0, host_budget=need - 1)
    assert small.use is False and "live teacher" in small.reason
    assert tc.decide("on", need, CPU, gpu_budget=0, host_budget=need - 1).use is True
