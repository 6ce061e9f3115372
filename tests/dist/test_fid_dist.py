"""FID and reference statistics on 1, 2 and 3 gloo processes (uneven shares) agree to 1e-12."""
import hashlib
import json
import multiprocessing as mp
import os
import traceback

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.dist

RES, NUM, NUM_REF = 16, 5, 4


def _tiny_model():
    from ict_scale.ict import ConsistencyModel
    from ict_scale.networks import build_network, network_c_noise
    torch.manual_seed(0)  # the same weights on every rank
    net = build_network("ncsnpp", model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(),
                        img_resolution=RES, dropout=0.0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ConsistencyModel(net, network_c_noise("ncsnpp"))


def _worker(rank, world_size, init_file, out_dir, ref_file, weights_file, digest):
    import torch.distributed as dist
    code = 0
    try:
        torch.set_num_threads(1)  # identical arithmetic in every process (and no oversubscription)
        if world_size > 1:
            dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        from ict_scale.data import DataConfig, build_loader
        from ict_scale.eval import EvalConfig, FIDEvaluator, SampleSpec, build_inception
        from ict_scale.eval.data_stats import dataset_statistics
        features = build_inception(weights_file, sha256=digest)
        cfg = EvalConfig(num=NUM, steps=[1, 2], batch_per_rank=1, ref=ref_file, seed=11)
        result = FIDEvaluator(cfg, "cpu", features=features).score(_tiny_model(), SampleSpec((3, RES, RES), 0, 0.821))
        loader = build_loader(DataConfig(source="synthetic", resolution=RES, drop_labels=True, hflip=False,
                                         shuffle=False, num_workers=0), batch_per_rank=1, rank=rank,
                              world_size=world_size, seed=0)
        mu, sigma, _, _ = dataset_statistics(loader, features, NUM_REF, {"data": "synthetic", "resolution": RES})
        np.savez(os.path.join(out_dir, f"w{world_size}_r{rank}.npz"), mu=mu, sigma=sigma,
                 result=np.array(json.dumps(result)))
        if world_size > 1:
            dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)  # skip interpreter teardown: avoids rare aborts after destroy_process_group


def _edm_reference(path):
    rng = np.random.default_rng(0)
    a = np.abs(rng.standard_normal((2500, 2048))) * 0.2  # full rank, feature-like magnitudes
    np.savez(path, mu=a.mean(0), sigma=np.cov(a, rowvar=False))


def test_single_process_equals_two_and_three_processes(tmp_path):
    from ict_scale.eval import random_inception_state_dict
    weights = tmp_path / "inception.pth"
    torch.save(random_inception_state_dict(seed=2), weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    ref = str(tmp_path / "ref.npz")
    _edm_reference(ref)
    ctx = mp.get_context("spawn")
    procs = []
    for world_size in (1, 2, 3):
        init = tmp_path / f"init_{world_size}"
        procs += [ctx.Process(target=_worker, args=(r, world_size, str(init), str(tmp_path), ref, str(weights), digest))
                  for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=900)
    assert [p.exitcode for p in procs] == [0] * len(procs)

    def load(world_size, rank):
        with np.load(tmp_path / f"w{world_size}_r{rank}.npz") as f:
            return json.loads(str(f["result"])), f["mu"], f["sigma"]

    base, mu1, sigma1 = load(1, 0)
    assert base["num"] == NUM and base["fid_1step"] > 0 and base["fid_2step"] > 0
    for world_size in (2, 3):  # shares of 5 samples: 2+3 and 1+2+2; of 4 reference images: 2+2 and 2+1+1
        for rank in range(world_size):
            result, mu, sigma = load(world_size, rank)
            assert result["world_size"] == world_size and result["num"] == NUM
            for key in ("fid_1step", "fid_2step"):
                assert result[key] == pytest.approx(base[key], rel=1e-12)
            np.testing.assert_allclose(mu, mu1, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(sigma, sigma1, rtol=1e-12, atol=1e-15)
