"""Distillation beyond the paper's loss: the teacher cache, unlabelled scans, a labelled subset,
class-balanced PMD, and the trainer's schedule and option handling. Tiny phantoms (64x64)."""
import json
import math
import shutil

import pytest
import torch

from tests.training_data import TINY, write_phantom_lits
from regionkd.sdk.errors import InputError
from regionkd.train import losses as L
from regionkd.train.checkpoint import load_checkpoint, log_path_for
from regionkd.train.config import make_config
from regionkd.train.distill_loss import DistillLoss, teacher_targets
from regionkd.train.sampling import IGNORE_LABEL
from regionkd.train.run_data import labelled_subset
from regionkd.train.trainer import train



@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    """Three more phantoms as a LiTS folder whose segmentation files are deleted: nothing may
    try to read a label."""
    root = write_phantom_lits(tmp_path_factory.mktemp("unlabelled"), n=3, shape=(64, 64, 10), seed=9)
    for p in root.glob("segmentation-*"):
        p.unlink()
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def teacher_ckpt(data, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    train(make_config("teacher", "unet", data, out, cache_dir=cache, **{**TINY, "max_steps": 2}))
    return out


def read_log(out):
    return [json.loads(line) for line in log_path_for(out).read_text().splitlines()]


def step_losses(out):
    return [r["loss"] for r in read_log(out) if r["event"] == "step"]


# ---------- teacher cache ----------

def test_teacher_cache_gives_the_same_run_filled_or_read(teacher_ckpt, data, cache, tmp_path):
    tc = tmp_path / "tcache"
    opts = dict(TINY, epochs=2, teacher=str(teacher_ckpt), cache_dir=cache, teacher_cache=str(tc), kd="pmd,imd,rad")
    first = train(make_config("distill", "tinynet", data, tmp_path / "a.pt", **opts))
    second = train(make_config("distill", "tinynet", data, tmp_path / "b.pt", **opts))
    assert first["teacher_cache"]["items_filled"] > 0 and second["teacher_cache"]["items_filled"] == 0
    assert second["teacher_cache"]["items_read"] == 2 * 3 * 4 and second["teacher_cache"]["bytes"] > 0
    assert first["params_sha256"] == second["params_sha256"]
    assert step_losses(tmp_path / "a.pt") == step_losses(tmp_path / "b.pt")
    assert [r["epoch"] for r in read_log(tmp_path / "a.pt") if r["event"] == "teacher_cache"][0] == 0
    assert not [r for r in read_log(tmp_path / "b.pt") if r["event"] == "teacher_cache"]
    # other KD terms and weights, another student, another seed: the same cache (slices x 8 orientations)
    third = train(make_config("distill", "tinynet", data, tmp_path / "c.pt", **{**opts, "alpha": 1.0, "kd": "pmd"}))
    assert third["teacher_cache"]["items_filled"] == 0
    other = train(make_config("distill", "tinynet", data, tmp_path / "d.pt", **{**opts, "seed": 1}))
    assert other["teacher_cache"]["dir"] == first["teacher_cache"]["dir"]
    assert other["teacher_cache"]["items"] == first["teacher_cache"]["items_filled"] + other["teacher_cache"]["items_filled"]
    assert other["teacher_cache"]["items"] <= 4 * 12 * 8      # 4 training cases x 12 slices x 8 orientations
    assert len([p for p in tc.iterdir() if p.is_dir()]) == 1


def test_teacher_cache_losses_match_the_live_teacher(teacher_ckpt, data, cache, tmp_path):
    """The cached run trains on float16-rounded teacher outputs: its loss terms at the first step
    (same student weights, same batch) differ from the live teacher's by far less than 0.1%."""
    opts = dict(TINY, max_steps=1, teacher=str(teacher_ckpt), cache_dir=cache, kd="pmd,imd,rad")
    train(make_config("distill", "tinynet", data, tmp_path / "live.pt", **opts))
    train(make_config("distill", "tinynet", data, tmp_path / "cached.pt", teacher_cache=str(tmp_path / "tc"), **opts))
    live, cached = step_losses(tmp_path / "live.pt")[0], step_losses(tmp_path / "cached.pt")[0]
    assert live["seg"] == cached["seg"]
    for k in ("pmd", "imd", "rad"):
        assert cached[k] == pytest.approx(live[k], rel=1e-3, abs=1e-6), k


def test_an_unfinished_cache_chunk_is_never_read(teacher_ckpt, data, cache, tmp_path):
    """Chunks appear under their name only when complete: a temporary folder of an interrupted
    fill, or a chunk without its item list, is ignored and its items computed again."""
    tc = tmp_path / "tc"
    opts = dict(TINY, teacher=str(teacher_ckpt), cache_dir=cache, teacher_cache=str(tc), kd="pmd,imd,rad")
    first = train(make_config("distill", "tinynet", data, tmp_path / "a.pt", **opts))
    entry = next(p for p in tc.iterdir() if p.is_dir())
    chunk = next(entry.glob("chunk-*"))
    shutil.copytree(chunk, entry / f".{chunk.name}.partial")
    (chunk / "items.json").unlink()
    again = train(make_config("distill", "tinynet", data, tmp_path / "b.pt", **opts))
    assert again["teacher_cache"]["items_filled"] == first["teacher_cache"]["items_filled"]
    assert again["params_sha256"] == first["params_sha256"]


def test_the_teacher_sees_the_students_slice_without_the_jitter(data, cache):
    from regionkd.train.data.slices import SliceCache, SliceDataset
    from regionkd.train.sampling import SeededItems

    ds = SliceDataset(SliceCache.open(cache), augment=True)
    seen = set()
    for seed in range(40):
        image, label, o = SeededItems(ds)[(0, 5, seed)]
        view, view_label = ds.view(5, o)
        assert torch.equal(label, view_label)
        a, b = image.flatten(), view.flatten()
        inside = (a > -0.999) & (a < 0.999)          # away from the clipping
        fit = torch.linalg.lstsq(torch.stack([b[inside], torch.ones_like(b[inside])], 1), a[inside, None]).solution
        assert 0.9 - 1e-4 <= float(fit[0]) <= 1.1 + 1e-4 and abs(float(fit[1])) <= 0.05 + 1e-4
        seen.add(o)
    assert seen == set(range(8))


# ---------- unlabelled scans and a labelled subset ----------

def test_distill_with_unlabelled_scans_never_reads_a_label(teacher_ckpt, data, unlabelled, cache, tmp_path):
    out = tmp_path / "u.pt"
    s = train(make_config("distill", "tinynet", data, out, teacher=str(teacher_ckpt), cache_dir=cache,
                          unlabelled=str(unlabelled), unlabelled_batch=2, kd="pmd,imd,rad",
                          teacher_cache=str(tmp_path / "tc"), **TINY))
    start = read_log(out)[0]
    assert start["unlabelled_slices"] == 30 and s["steps"] == 3
    assert all(r[k] is not None for r in step_losses(out) for k in ("seg", "pmd", "imd", "rad", "total"))
    ckpt = load_checkpoint(out)
    assert ckpt["provenance"]["unlabelled"] == str(unlabelled.resolve())
    # the batches really carry unlabelled slices: the cache holds items of the unlabelled cases
    from regionkd.train.data.slices import SliceCache
    from regionkd.train.teacher_cache import case_tag

    u_cache = SliceCache.open(f"{cache}-unlabelled")
    tags = {case_tag(u_cache, cid) for cid in u_cache.case_ids}
    entry = next(p for p in (tmp_path / "tc").iterdir() if p.is_dir())
    keys = [k for c in entry.glob("chunk-*") for k in json.loads((c / "items.json").read_text())]
    assert 0 < sum(k.split("/")[0] in tags for k in keys) <= 3 * 2


def test_kd_on_unlabelled_slices_only(teacher_ckpt, data, unlabelled, cache, tmp_path):
    """--kd-on unlabelled: the teacher sees only the unlabelled slices (the cache holds nothing
    else) and the distillation terms are computed on them alone."""
    from regionkd.train.data.slices import SliceCache
    from regionkd.train.teacher_cache import case_tag

    s = train(make_config("distill", "tinynet", data, tmp_path / "u.pt", teacher=str(teacher_ckpt), cache_dir=cache,
                          unlabelled=str(unlabelled), unlabelled_batch=2, kd="pmd,rad", kd_on="unlabelled",
                          teacher_cache=str(tmp_path / "tc"), **TINY))
    assert s["teacher_cache"]["items_read"] == 3 * 2                 # 3 steps x 2 unlabelled slices
    u_cache = SliceCache.open(f"{cache}-unlabelled")
    tags = {case_tag(u_cache, cid) for cid in u_cache.case_ids}
    entry = next(p for p in (tmp_path / "tc").iterdir() if p.is_dir())
    keys = [k for c in entry.glob("chunk-*") for k in json.loads((c / "items.json").read_text())]
    assert keys and all(k.split("/")[0] in tags for k in keys)
    assert all(r["pmd"] is not None and r["rad"] is not None for r in step_losses(tmp_path / "u.pt"))
    with pytest.raises(InputError, match="needs --unlabelled"):
        make_config("distill", "tinynet", data, tmp_path / "x.pt", teacher="t.pt", kd_on="unlabelled", preset="demo")


def test_kd_rows_select_the_slices_the_terms_see():
    cfg = make_config("distill", "tinynet", "d", "o.pt", teacher="t.pt", kd="pmd", temperature=4.0,
                      pmd_balance="pixels", preset="demo")
    torch.manual_seed(1)
    s_logits, labels = torch.randn(3, 3, 8, 8), torch.randint(0, 3, (3, 8, 8))
    feats = {"low": torch.randn(3, 4, 4, 4), "high": torch.randn(3, 4, 2, 2)}
    labels[1:] = IGNORE_LABEL
    t_logits = torch.randn(2, 3, 8, 8)
    targets = teacher_targets(type("T", (torch.nn.Module,), {"forward_features": lambda self, x: (
        t_logits, {"low": torch.randn(2, 5, 4, 4), "high": torch.randn(2, 5, 2, 2)})})(),
        torch.zeros(2, 1, 8, 8), labels[1:], 3)
    terms = DistillLoss(cfg, 3, distill=True)(s_logits, feats, labels, targets, kd_rows=torch.tensor([False, True, True]))
    assert terms["pmd"].item() == pytest.approx(L.pmd_loss(s_logits[1:], t_logits, 4.0).item())
    assert terms["seg"].item() == pytest.approx(L.segmentation_loss(s_logits[:1], labels[:1]).item())


def test_pseudo_label_term_is_the_segmentation_loss_against_the_teachers_argmax():
    cfg = make_config("distill", "tinynet", "d", "o.pt", teacher="t.pt", kd="pl", pl_weight=0.5, preset="demo")
    torch.manual_seed(2)
    s_logits, labels = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    feats = {"low": torch.randn(2, 4, 4, 4), "high": torch.randn(2, 4, 2, 2)}
    t_logits = torch.randn(2, 3, 8, 8)
    targets = teacher_targets(type("T", (torch.nn.Module,), {"forward_features": lambda self, x: (
        t_logits, {"low": torch.randn(2, 5, 4, 4), "high": torch.randn(2, 5, 2, 2)})})(), torch.zeros(2, 1, 8, 8), labels, 3)
    terms = DistillLoss(cfg, 3, distill=True)(s_logits, feats, labels, targets)
    expected = L.segmentation_loss(s_logits, t_logits.argmax(1))
    assert terms["pl"].item() == pytest.approx(expected.item())
    assert terms["total"].item() == pytest.approx(terms["seg"].item() + 0.5 * expected.item())
    default = make_config("distill", "x", "d", "o", teacher="t", preset="demo")
    assert terms["pmd"] is None and (default.kd, default.alpha, default.temperature, default.pmd_balance) == (("pmd",), 1.0, 1.0, "classes")


def test_seg_loss_uses_only_labelled_slices_and_kd_all():
    cfg = make_config("distill", "tinynet", "d", "o.pt", teacher="t.pt", kd="pmd,rad", temperature=4.0,
                      pmd_balance="pixels", preset="demo")
    torch.manual_seed(0)
    s_logits = torch.randn(3, 3, 8, 8)
    feats = {"low": torch.randn(3, 4, 4, 4), "high": torch.randn(3, 4, 2, 2)}
    labels = torch.randint(0, 3, (3, 8, 8))
    labels[2] = IGNORE_LABEL
    t_logits = torch.randn(3, 3, 8, 8)
    t_feats = {"low": torch.randn(3, 5, 4, 4), "high": torch.randn(3, 6, 2, 2)}

    class Teacher(torch.nn.Module):
        def forward_features(self, x):
            return t_logits, t_feats

    targets = teacher_targets(Teacher(), torch.zeros(3, 1, 8, 8), labels, 3)
    terms = DistillLoss(cfg, 3, distill=True)(s_logits, feats, labels, targets)
    assert terms["seg"].item() == pytest.approx(L.segmentation_loss(s_logits[:2], labels[:2]).item())
    assert terms["pmd"].item() == pytest.approx(L.pmd_loss(s_logits, t_logits, 4.0).item())
    regions = labels.clone()
    regions[2] = t_logits[2].argmax(0)     # the unlabelled slice's regions: the teacher's prediction
    onehot = torch.nn.functional.one_hot(regions, 3).permute(0, 3, 1, 2).float()
    expected = sum(L.rad_loss(feats[lv], t_feats[lv], onehot) for lv in ("low", "high"))
    assert terms["rad"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_labelled_subset_is_fixed_and_bounded(data, cache, tmp_path):
    ids = [f"c{i}" for i in range(10)]
    a = labelled_subset(ids, 3, seed=0)
    assert len(a) == 3 and a == labelled_subset(ids, 3, seed=0) and set(a) <= set(ids)
    assert labelled_subset(ids, None, seed=0) == ids
    with pytest.raises(InputError, match="only 10 case"):
        labelled_subset(ids, 11, seed=0)
    out = tmp_path / "few.pt"
    train(make_config("student", "tinynet", data, out, cache_dir=cache, labelled_cases=2, **TINY))
    assert read_log(out)[0]["train_cases"] == 2


def test_unlabelled_and_cache_refused_outside_distillation(data, tmp_path):
    with pytest.raises(InputError, match="only apply to distillation"):
        make_config("student", "tinynet", data, tmp_path / "s.pt", unlabelled=str(tmp_path), preset="demo")


def test_open_images_reads_every_layout_without_labels(tmp_path, unlabelled):
    from regionkd.train.cli_phantoms import phantoms
    from regionkd.train.data import open_images

    assert open_images(unlabelled).layout == "lits" and len(open_images(unlabelled)) == 3
    phantoms.main([str(tmp_path / "plain"), "--cases", "2", "--shape", "32,32,8", "--images-only", "--quiet"],
                  standalone_mode=False)
    plain = open_images(tmp_path / "plain")
    assert plain.layout == "folder" and plain.case_ids == ["ct-0000", "ct-0001"]
    assert plain.load_image("ct-0001").data.shape == (32, 32, 8)
    phantoms.main([str(tmp_path / "kits"), "--task", "kidney", "--cases", "2", "--shape", "32,32,8", "--quiet"],
                  standalone_mode=False)
    for p in (tmp_path / "kits").glob("case_*/segmentation.nii.gz"):
        p.unlink()
    assert open_images(tmp_path / "kits").case_ids == ["case_00000", "case_00001"]
    phantoms.main([str(tmp_path / "msd"), "--layout", "msd", "--cases", "2", "--shape", "32,32,8", "--quiet"],
                  standalone_mode=False)
    assert open_images(tmp_path / "msd").case_ids == ["imagesTr/liver_000", "imagesTr/liver_001"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no CT image"):
        open_images(tmp_path / "empty")


# ---------- PMD balance, schedule, options ----------

def test_class_balanced_pmd_weighs_each_teacher_class_equally():
    t = torch.tensor([[[[5.0, 5.0, 5.0, 0.0]], [[0.0, 0.0, 0.0, 5.0]]]])   # teacher: 3 pixels class 0, 1 class 1
    s = torch.zeros(1, 2, 1, 4)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s, 1), torch.log_softmax(t, 1), reduction="none",
                                    log_target=True).sum(1)[0, 0]
    assert L.pmd_loss(s, t, 1.0, balance="pixels").item() == pytest.approx(kl.mean().item())
    assert L.pmd_loss(s, t, 1.0, balance="classes").item() == pytest.approx(((kl[:3].mean() + kl[3]) / 2).item())
    s2 = torch.tensor([[[[5.0, 5.0, 5.0, 9.0]], [[0.0, 0.0, 0.0, 0.0]]]])   # only the lesion pixel is wrong:
    # its KL is 1/4 of the pixel mean but 1/2 of the class mean
    assert L.pmd_loss(s2, t, 1.0, "classes").item() == pytest.approx(2 * L.pmd_loss(s2, t, 1.0, "pixels").item())
    with pytest.raises(ValueError, match="balance"):
        L.pmd_loss(s, t, 1.0, balance="bogus")


def test_max_steps_shortens_the_cosine_schedule(data, cache, tmp_path):
    out = tmp_path / "short.pt"
    train(make_config("student", "tinynet", data, out, cache_dir=cache, **{**TINY, "epochs": 4, "max_steps": 3}))
    lrs = [r["lr"] for r in read_log(out) if r["event"] == "step"]
    base = 2e-3
    assert lrs == pytest.approx([base * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(3)])
    assert load_checkpoint(out)["train_state"]["finished"] is True


def test_none_is_applied_not_dropped():
    cfg = make_config("student", "enet", "d", "o.pt", preset="demo", val_max_slices=None)
    assert cfg.val_max_slices is None                      # the demo preset's 192 would be a silent change
    with pytest.raises(InputError, match="cannot be None"):
        make_config("student", "enet", "d", "o.pt", preset="demo", epochs=None)
