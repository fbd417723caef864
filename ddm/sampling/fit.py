"""Do the loaded pieces of an ensemble belong together? The checks ``load_ensemble`` runs before sampling.

Experts and router must come from one clustering (for a grown run, each expert
from the ancestor its cluster was kept from: ``ddm.lineage``), with one
K, one flow path, one image shape, one label set, one latent space and one text
tower; guidance needs trained null labels. Each refusal names the files and the fix.
"""

from __future__ import annotations

from ddm.artifacts import RunDir
from ddm.errors import BadInput
from ddm.io import read_json
from ddm.job_names import expert_job
from ddm.lineage import check_member
from ddm.sampling.loaded import LoadedModels

# Fields of FlowPath.config() that define the path itself. The others (time
# sampling during training, t_eps) may differ between jobs without changing
# what a velocity or a posterior means.
PATH_FIELDS = ("schedule",)


def check_guidance(
    info: LoadedModels, cfg_scale: float, key: str = "sample.cfg_scale", cfg_routing: str = "shared"
) -> None:
    """Refuse classifier-free guidance with experts (or, routed separately, a router) whose null label was never
    trained.

    An expert trained with ``label_dropout=0`` never saw the null label, so its
    "unconditional" velocity is noise from an untrained embedding row and
    guidance amplifies it. With ``cfg_routing=separate`` the router routes the
    null input too, so its own null label must have been trained.
    """
    if float(cfg_scale) == 1.0 or not (info.num_classes or info.text):
        return
    router_dropout = info.router_label_dropout
    if cfg_routing == "separate" and router_dropout is not None and float(router_dropout) <= 0:
        raise BadInput(
            "sample.cfg_routing=separate routes guidance's null input with the router, but it was trained with "
            "router.label_dropout=0 (its null label is untrained): use sample.cfg_routing=shared, or retrain "
            "the router with router.label_dropout > 0 (e.g. 0.1)"
        )
    untrained = [k for k, p in info.expert_label_dropout.items() if p is not None and float(p) <= 0]
    if untrained:
        raise BadInput(
            f"{key}={cfg_scale} needs each expert's unconditional branch, but experts {untrained} were trained "
            f"with expert.label_dropout=0 (their null label is untrained): sample with {key}=1, or retrain "
            f"them with expert.label_dropout > 0 (e.g. 0.1)"
        )


def common_latents(metas: dict, rmeta: dict) -> dict | None:
    """The latent space every expert and the router share; mixing VAEs (or latents and pixels) is refused."""
    seen = {
        path: (m.get("latents") or {}).get("vae", {}).get("weights_sha256")
        for path, m in [(m["path"], m) for m in metas.values()] + [(rmeta["path"], rmeta)]
    }
    if len(set(seen.values())) > 1:
        raise BadInput(
            f"the experts and the router were trained in different latent spaces (VAE weights by file: {seen}); "
            f"train them all on one run's latents"
        )
    return next(iter(metas.values())).get("latents")


def _text_tower(meta: dict):
    text = meta.get("text")
    return None if not text else (text.get("model"), text.get("weights_sha256"), text.get("init_seed"))


def common_text(metas: dict, rmeta: dict) -> dict | None:
    """The text tower every expert (and a router that reads captions) was trained with; mixing towers is
    refused, since one prompt encoding serves them all."""
    seen = {m["path"]: _text_tower(m) for m in metas.values()}
    if rmeta.get("text"):
        seen[rmeta["path"]] = _text_tower(rmeta)
    if len(set(seen.values())) > 1:
        raise BadInput(
            f"the models were trained with different text towers (model, weights sha256, random seed by file: "
            f"{seen}); train them all with one text.model and text.pretrained"
        )
    return next(iter(metas.values())).get("text")


def check_router(router, rmeta: dict, rd: RunDir) -> None:
    K = int(rmeta["num_experts"])
    if router.num_outputs != K:
        raise BadInput(
            f"{rmeta['path']} says num_experts={K} but its network has {router.num_outputs} "
            f"outputs: the file is inconsistent; retrain with `ddm train-router redo=true`"
        )
    if rd.cluster_report.exists():
        report = read_json(rd.cluster_report)
        k_report = report.get("k", report.get("num_clusters"))
        if k_report is not None and int(k_report) != K:
            raise BadInput(
                f"the router {rmeta['path']} was trained for K={K} experts but "
                f"{rd.cluster_report} has K={k_report} clusters: retrain the router "
                f"(`ddm train-router redo=true`) or use the run it belongs to"
            )
        cid_report = report.get("clustering_id")
        if cid_report is not None and cid_report != rmeta["clustering_id"]:
            raise BadInput(
                f"the router {rmeta['path']} was trained on clustering {rmeta['clustering_id']}, "
                f"but {rd.cluster_report} is clustering {cid_report}: retrain the router and "
                f"experts on the current clustering or use the matching run"
            )


def check_expert(k: int, meta: dict, rmeta: dict) -> None:
    where = meta["path"]
    if int(meta.get("expert_id", k)) != k:
        raise BadInput(
            f"{where} holds expert {meta['expert_id']}, not expert {k}: the file was copied "
            f"into the wrong folder; retrain or move it to experts/{expert_job(meta['expert_id'])}"
        )
    # the router's clustering, or for a grown run the ancestor this expert's cluster was kept from
    check_member(meta, k, rmeta, f"expert {k} ({where}, for the router {rmeta['path']})")
    mine = {f: meta["flow"].get(f) for f in PATH_FIELDS}
    theirs = {f: rmeta["flow"].get(f) for f in PATH_FIELDS}
    if mine != theirs:
        raise BadInput(
            f"expert {k} was trained on flow path {mine}, the router on {theirs} "
            f"({where} vs {rmeta['path']}): they must share one path; retrain with the same "
            f"flow.schedule"
        )


def check_image_shape(metas: dict, rmeta: dict) -> None:
    """Every expert and the router take images of one shape (experts of other sizes still see the same x)."""

    def shape(meta):
        mc = meta["model_config"]
        return (int(mc["in_channels"]), int(mc["image_size"]))

    seen = {meta["path"]: shape(meta) for meta in metas.values()}
    seen[rmeta["path"]] = shape(rmeta)
    if len(set(seen.values())) > 1:
        detail = ", ".join(f"{path}: {c} channel(s) x {s}px" for path, (c, s) in seen.items())
        raise BadInput(
            f"the experts and the router were trained on images of different shapes ({detail}); "
            f"one ensemble integrates one x: train them all on the same data (data.image_size, data.channels, "
            f"and in a latent run the same VAE)"
        )


def check_num_classes(experts: dict, router, metas: dict, rmeta: dict) -> None:
    by_model = {k: e.num_classes for k, e in experts.items()}
    by_model["router"] = router.num_classes
    if len(set(by_model.values())) > 1:
        files = {k: (metas[k]["path"] if k in metas else rmeta["path"]) for k in by_model}
        raise BadInput(
            f"models with num_classes mismatch: {by_model} ({files}); experts and router "
            f"must be trained on the same label set (data.num_classes)"
        )
