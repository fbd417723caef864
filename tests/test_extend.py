"""Growing a finished run with ``ddm extend``: a run on digits 0-4 grows by 5-9, untouched experts stay as they are.

The module's run: digits 0-4 clustered into K=2, two experts and a router;
then digits 5-9, prepared on their own, become cluster 2 (``new_cluster``).
A second, smaller run grows by ``assign``, where the experts that receive
images fine-tune from their own weights.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from ddm.artifacts import RunDir
from ddm.cluster import load_assignments
from ddm.config import settings
from ddm.data.shards import iter_samples, load_manifest, shard_paths
from ddm.errors import BadInput, MissingInput
from ddm.grow.clusters import check_mode, grown_report
from ddm.grow.measure import class_rates, digits_classifier
from ddm.io import read_json, sha256_file
from ddm.lineage import check_member, cluster_ids
from ddm.sampling.checkpoints import load_router
from ddm.sampling.ensemble_loading import load_ensemble
from ddm.stages import pipeline
from ddm.stages.runner import run_stage

OLD, NEW = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
FAST = ["experiment=tiny", "island.threads=1", "expert.steps=60", "router.steps=40", "sample.per_class=1"]


def classes(ids) -> str:
    return f"data.classes=[{','.join(map(str, ids))}]"


def files_of(folder) -> dict:
    """sha256 of every file under ``folder`` (relative path -> digest)."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def keys_of(folder) -> list[str]:
    return [s["key"] for s in iter_samples(shard_paths(folder, load_manifest(folder)), decode=False)]


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    root = tmp_path_factory.mktemp("grow")
    base = settings([*FAST, f"run_dir={root / 'base'}", classes(OLD)])
    pipeline.run(base)
    rd = RunDir(base.run_dir)
    before = dict(
        experts={k: files_of(rd.expert(k)) for k in range(2)},
        partitions={k: files_of(rd.partition(k)) for k in range(2)},
        embeddings={p.name: sha256_file(p) for p in sorted(rd.embeddings.glob("emb-*.npy"))},
        report=read_json(rd.cluster_report),
        router_accuracy=np.mean([r["accuracy"] for r in read_json(rd.router_record)["accuracy_by_t"]]),
    )
    run_stage("prepare", settings([*FAST, f"run_dir={root / 'new'}", classes(NEW)]))
    shutil.copytree(rd.root, root / "pristine")  # the run before it grew, for the interrupted extension
    extend_cfg = settings([*FAST, f"run_dir={rd.root}", f"extend.shards={root / 'new' / 'data'}"])
    result = run_stage("extend", extend_cfg)
    return dict(rd=rd, root=root, before=before, result=result, extend_cfg=extend_cfg)


def test_untouched_experts_and_their_partitions_stay_byte_identical(grown):
    rd, before = grown["rd"], grown["before"]
    for k in range(2):
        assert files_of(rd.expert(k)) == before["experts"][k], f"expert {k} changed"
        assert files_of(rd.partition(k)) == before["partitions"][k], f"partition {k} changed"
    # the old shards' embeddings are reused, not recomputed
    now = {p.name: sha256_file(p) for p in sorted(rd.embeddings.glob("emb-*.npy"))}
    assert {n: now[n] for n in before["embeddings"]} == before["embeddings"] and len(now) > len(before["embeddings"])


def test_the_new_images_become_cluster_k_of_a_clustering_that_records_its_parent(grown):
    rd, old = grown["rd"], grown["before"]["report"]
    report = read_json(rd.cluster_report)
    new_keys = keys_of(grown["root"] / "new" / "data")
    assert report["k"] == 3 and report["parent"] == old["clustering_id"] != report["clustering_id"]
    assert report["cluster_ids"] == [old["clustering_id"]] * 2 + [report["clustering_id"]]
    assert report["lineage"] == {old["clustering_id"]: 2}
    assert report["extensions"][-1]["clusters"] == [2] and report["sizes"][:2] == old["sizes"]
    # cluster 2 holds exactly the new images, and the old images keep their clusters
    assert sorted(keys_of(rd.partition(2))) == sorted(new_keys)
    a = load_assignments(rd.assignments)
    assert a.clustering_id == report["clustering_id"] and a.keys.tolist()[-len(new_keys) :] == new_keys
    assert (a.cluster[-len(new_keys) :] == 2).all()
    index = read_json(rd.partitions_index)
    assert cluster_ids(index) == report["cluster_ids"] and index["sizes"][2] == len(new_keys)
    data = load_manifest(rd.data)
    assert data["num_samples"] == old["num_samples"] + len(new_keys) and data["keys_sha256"] == report["keys_sha256"]


def test_the_router_is_retrained_with_k_plus_one_outputs_and_the_old_one_kept_in_history(grown):
    rd, result, before = grown["rd"], grown["result"], grown["before"]
    router, meta = load_router(rd.router_weights)
    assert router.num_outputs == 3 and meta["cluster_ids"] == read_json(rd.cluster_report)["cluster_ids"]
    old_router = rd.root / "history" / before["report"]["clustering_id"] / "router"
    assert load_router(old_router / "router.pt")[0].num_outputs == 2
    assert result["router_accuracy_before"] == pytest.approx(before["router_accuracy"])
    assert 0 < result["router_accuracy_after"] <= 1


def test_samples_of_the_new_classes_come_from_the_new_expert(grown):
    """The router sends 5-9 to the expert that learnt them and 0-4 elsewhere. (Whether a 60-step expert's
    digits are recognisable is not this test's question: scripts/grow_experiment.py measures that.)"""
    rd = grown["rd"]
    rates = class_rates(rd.root, [*OLD, *NEW], digits_classifier(), per_class=16, steps=8, group=NEW)
    for c in NEW:
        assert rates[c]["experts"][2] > 0.9, (c, rates[c])
    for c in OLD:
        assert rates[c]["experts"][2] < 0.1, (c, rates[c])


def test_the_grown_run_samples_and_extending_again_changes_nothing(grown):
    rd = grown["rd"]
    ensemble, _, info = load_ensemble(rd.root)
    assert info.num_experts == 3 and info.experts == [0, 1, 2]
    everything = {n: files_of(rd.root / n) for n in ("experts", "router", "partitions", "clusters", "data")}
    run_stage("extend", grown["extend_cfg"])
    assert {n: files_of(rd.root / n) for n in everything} == everything


def test_an_expert_of_another_lineage_is_refused(grown, tmp_path):
    copy = RunDir(tmp_path / "copy")
    shutil.copytree(grown["rd"].root, copy.root)
    path = copy.expert_weights(0)
    payload = torch.load(path, weights_only=True)
    payload["clustering_id"] = "0123456789abcdef"  # an expert 0 trained on some other clustering
    torch.save(payload, path)
    record = read_json(copy.expert_record(0))
    record["weights_sha256"] = sha256_file(path)
    copy.expert_record(0).write_text(__import__("json").dumps(record))
    with pytest.raises(BadInput, match="cluster 0 of clustering .* was kept from clustering"):
        load_ensemble(copy.root)
    # and the router of before the growth no longer fits the run
    shutil.rmtree(copy.router)
    old = grown["before"]["report"]["clustering_id"]
    shutil.copytree(copy.root / "history" / old / "router", copy.router)
    with pytest.raises(BadInput, match="K=2"):
        load_ensemble(copy.root)


def test_lineage_accepts_an_ancestor_only_for_the_clusters_it_kept():
    index = dict(clustering_id="new", num_clusters=3, cluster_ids=["old", "old", "new"], lineage={"old": 2})
    check_member(dict(clustering_id="old", num_experts=2), 0, index, "e0")
    check_member(dict(clustering_id="new", num_experts=3), 2, index, "e2")
    with pytest.raises(BadInput, match="the run is clustering new"):
        check_member(dict(clustering_id="old", num_experts=2), 2, index, "e2")  # cluster 2 is new
    with pytest.raises(BadInput, match="other"):
        check_member(dict(clustering_id="other", num_experts=2), 0, index, "e0")
    with pytest.raises(BadInput, match="K=2"):
        check_member(dict(clustering_id="old", num_experts=3), 1, index, "e1")  # old had K=2
    fresh = dict(clustering_id="a", num_clusters=2)
    assert cluster_ids(fresh) == ["a", "a"]


def test_grown_report_ids_by_hand():
    report = dict(k=2, clustering_id="p", num_samples=3, sizes=[2, 1], method="flat")
    labels = np.array([0, 1, 0, 1, 1], dtype=np.int32)  # two new samples, both to cluster 1
    out = grown_report(report, ["a", "b", "c", "d", "e"], labels, dict(mode="assign"), "sha")
    assert out["k"] == 2 and out["sizes"] == [2, 3] and out["parent"] == "p"
    assert out["cluster_ids"] == ["p", out["clustering_id"]] and out["lineage"] == {"p": 2}
    assert out["extensions"][0]["clusters"] == [1] and out["extensions"][0]["added"] == [0, 2]


def test_bad_extensions_are_refused_with_the_reason(grown, tmp_path, make_cfg):
    rd, root = grown["rd"], grown["root"]
    base = [*FAST, f"run_dir={rd.root}"]
    with pytest.raises(BadInput, match="extend.shards is not set"):
        run_stage("extend", settings(base))
    with pytest.raises(BadInput, match="holds no manifest.json"):
        run_stage("extend", settings([*base, f"extend.shards={tmp_path}"]))
    with pytest.raises(BadInput, match="the run's own data"):
        run_stage("extend", settings([*base, f"extend.shards={rd.data}"]))
    with pytest.raises(BadInput, match="extend.mode='grow'"):
        run_stage("extend", settings([*base, f"extend.shards={root / 'new' / 'data'}", "extend.mode=grow"]))
    with pytest.raises(BadInput, match="cluster.method=random"):
        check_mode("assign", "random")
    # images the run holds already (class 4), and images of another size
    run_stage("prepare", settings([*FAST, f"run_dir={tmp_path / 'again'}", classes([4, 5])]))
    with pytest.raises(BadInput, match="already in the run"):
        run_stage("extend", settings([*base, f"extend.shards={tmp_path / 'again' / 'data'}"]))
    big = settings([*FAST, f"run_dir={tmp_path / 'big'}", "data.resize=16", "data.image_size=16", classes([5])])
    run_stage("prepare", big)
    with pytest.raises(BadInput, match="image_size=16"):
        run_stage("extend", settings([*base, f"extend.shards={tmp_path / 'big' / 'data'}"]))
    # a shard changed on its way
    damaged = tmp_path / "damaged"
    shutil.copytree(root / "new" / "data", damaged)
    shard = sorted(damaged.glob("shard-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:-512])
    with pytest.raises(BadInput, match="checksum"):
        run_stage("extend", settings([*base, f"extend.shards={damaged}"]))
    with pytest.raises(MissingInput, match="no finished clustering"):
        run_stage("extend", make_cfg(*FAST, f"extend.shards={root / 'new' / 'data'}", run_dir=tmp_path / "empty"))


def test_data_classes_keeps_only_those_classes(make_cfg, tmp_path):
    from sklearn.datasets import load_digits

    cfg = make_cfg("data=digits", classes([1, 7]))
    run_stage("prepare", cfg)
    labels = [s["label"] for s in iter_samples(shard_paths(RunDir(cfg.run_dir).data), decode=False)]
    target = load_digits().target
    assert sorted(set(labels)) == [1, 7] and len(labels) == int(np.isin(target, [1, 7]).sum())
    assert load_manifest(RunDir(cfg.run_dir).data)["classes"] == [1, 7]
    for name, bad, match in (("none", "[]", "keeps no sample"), ("outside", "[3,12]", r"ids \[12\]")):
        with pytest.raises(BadInput, match=match):
            run_stage("prepare", make_cfg("data=digits", f"data.classes={bad}", run_dir=tmp_path / name))


@pytest.fixture(scope="module")
def assigned(tmp_path_factory):
    """digits 0-4 in K=2 grown by 5-9 with extend.mode=assign; the fine-tunes run at lr=0, so they must end
    exactly where they started."""
    root = tmp_path_factory.mktemp("assign")
    common = ["experiment=tiny", "island.threads=1", "expert.steps=10", "router.steps=10", "sample.per_class=1"]
    pipeline.run(settings([*common, f"run_dir={root / 'base'}", classes(OLD)]))
    rd = RunDir(root / "base")
    old = {k: (sha256_file(rd.expert_weights(k)), torch.load(rd.expert_weights(k))["state_dict"]) for k in range(2)}
    old_id = read_json(rd.cluster_report)["clustering_id"]
    run_stage("prepare", settings([*common, f"run_dir={root / 'new'}", classes(NEW)]))
    cfg = settings(
        [
            *common,
            f"run_dir={rd.root}",
            f"extend.shards={root / 'new' / 'data'}",
            "extend.mode=assign",
            "extend.finetune_steps=3",
            "expert.lr=0",
        ]
    )
    result = run_stage("extend", cfg)
    return rd, old, old_id, result


def test_assign_fine_tunes_the_experts_that_received_images_from_their_own_weights(assigned):
    rd, old, old_id, result = assigned
    report = read_json(rd.cluster_report)
    assert report["k"] == 2 and result["clusters"] and result["k_before"] == 2
    for k in range(2):
        payload = torch.load(rd.expert_weights(k))
        if k in result["clusters"]:
            assert payload["initialised_from"]["sha256"] == old[k][0]
            assert payload["initialised_from"]["clustering_id"] == old_id
            assert read_json(rd.expert_record(k))["steps"] == 3
            moved = rd.root / "history" / old_id / f"expert-{k:02d}" / "expert.pt"
            assert sha256_file(moved) == old[k][0]
            # at lr=0 the fine-tune leaves the weights it started from exactly as they were
            for name, tensor in old[k][1].items():
                assert torch.equal(payload["state_dict"][name], tensor), name
        else:
            assert sha256_file(rd.expert_weights(k)) == old[k][0]
    load_ensemble(rd.root)  # one clustering again: the ensemble loads


def test_a_fine_tune_refuses_a_start_of_another_kind(assigned, tmp_path):
    rd, _, old_id, result = assigned
    copy = RunDir(tmp_path / "copy")
    shutil.copytree(rd.root, copy.root)
    k = result["clusters"][0]
    start = copy.root / "history" / old_id / f"expert-{k:02d}" / "expert.pt"
    cfg = settings(
        [
            "experiment=tiny",
            f"run_dir={copy.root}",
            f"expert.id={k}",
            "redo=true",
            "model.size=DiT-T/2",
            f"expert.init={start}",
            "expert.steps=1",
        ]
    )
    with pytest.raises(BadInput, match="fine-tune with the model and target"):
        run_stage("train-expert", cfg)


def test_status_says_the_run_grew_and_lists_a_student(grown, tmp_path, capsys):
    copy = RunDir(tmp_path / "copy")
    shutil.copytree(grown["rd"].root, copy.root)
    cfg = settings([f"run_dir={copy.root}"])
    table = run_stage("status", cfg)
    assert table["k"] == 3 and table["distilled"] is None and [e["state"] for e in table["experts"]] == ["done"] * 3
    assert "grown from K=2 by `ddm extend`, 1 time(s)" in capsys.readouterr().out
    copy.distilled.mkdir()
    copy.distilled_record.write_text('{"steps": 7, "final_loss": 0.5}')
    table = run_stage("status", cfg)
    assert table["distilled"]["state"] == "done" and table["distilled"]["steps"] == 7
    assert "distilled: done" in capsys.readouterr().out


def test_an_interrupted_extension_finishes_where_it_stopped(grown, tmp_path, monkeypatch):
    from ddm.stages import extend

    rd = RunDir(tmp_path / "run")
    shutil.copytree(grown["root"] / "pristine", rd.root)
    cfg = settings([*FAST, f"run_dir={rd.root}", f"extend.shards={grown['root'] / 'new' / 'data'}"])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed after the data was appended")

    monkeypatch.setattr(extend, "_grow_clustering", killed)
    with pytest.raises(KeyboardInterrupt):
        run_stage("extend", cfg)
    assert load_manifest(rd.data)["extensions"] and read_json(rd.cluster_report)["k"] == 2
    monkeypatch.undo()
    run_stage("extend", cfg)
    # the same clustering as an extension that ran through, the old experts untouched
    assert read_json(rd.cluster_report)["clustering_id"] == read_json(grown["rd"].cluster_report)["clustering_id"]
    assert len(load_manifest(rd.data)["extensions"]) == 1
    for k in range(2):
        assert files_of(rd.expert(k)) == grown["before"]["experts"][k]
    assert load_router(rd.router_weights)[0].num_outputs == 3


def test_a_missing_or_changed_start_is_refused(assigned, tmp_path):
    from ddm.errors import Unusable
    from ddm.train.fine_tune import initial_weights

    rd, _, old_id, result = assigned
    k = result["clusters"][0]
    manifest = load_manifest(rd.partition(k))
    with pytest.raises(MissingInput, match="expert.init=.*no such file"):
        initial_weights(settings([f"run_dir={rd.root}", f"expert.init={tmp_path / 'none.pt'}"]), rd, manifest)
    copy = RunDir(tmp_path / "copy")
    shutil.copytree(rd.root, copy.root)
    start = copy.root / manifest["previous_expert"]["path"]
    start.write_bytes(start.read_bytes() + b"x")  # changed on its way
    with pytest.raises(Unusable, match="does not match the sha256"):
        initial_weights(settings([f"run_dir={copy.root}"]), copy, manifest)
    start.unlink()
    with pytest.raises(MissingInput, match="fine-tunes from .*expert.init=scratch"):
        initial_weights(settings([f"run_dir={copy.root}"]), copy, manifest)
