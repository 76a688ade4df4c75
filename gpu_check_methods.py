"""Temporary device check of faststeal.methods (removed after the run)."""
import os, sys, time, json, traceback
import torch
from faststeal import ops
from faststeal.methods import METHODS, build_method

dev = os.environ.get("DEV", "cuda")
print(torch.__version__, torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "backend env:", os.environ.get("FASTSTEAL_BACKEND"))
rep = ops.report()["cuda"]
print({k: v.split("(")[0].strip() for k, v in rep.items()})
C = 10
g = torch.Generator().manual_seed(0)
proto = torch.randn(C, 1, 28, 28, generator=g)
def data(n, seed):
    gg = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=gg)
    return proto[y] + 2.0 * torch.randn(n, 1, 28, 28, generator=gg), y
x, y = data(4000, 1); xt, yt = data(1000, 2)
out = {}
ONLY = os.environ.get("ONLY")
for arch in sys.argv[1].split(","):
    for name in (ONLY.split(",") if ONLY else METHODS):
        try:
            t = time.time()
            m = build_method(name, arch, (1, 28, 28), C, seed=0, device=dev)
            m.fit(x, y, epochs=3, batch_size=128, lr=1e-3, probe=xt[:500], record_every=20, progress=False)
            torch.cuda.synchronize() if dev == "cuda" else None; tf = time.time() - t
            pm = m.predict_members(xt); p = m.predict_proba(xt)
            acc = (p.argmax(-1).cpu() == yt).float().mean().item()
            det = None
            if arch == "mlp" or name in ("swag", "laplace"):
                m2 = build_method(name, arch, (1, 28, 28), C, seed=0, device=dev)
                m2.fit(x, y, epochs=3, batch_size=128, lr=1e-3, probe=xt[:500], record_every=20, progress=False)
                d = (m2.predict_members(xt) - pm).abs().max().item()
                det = d
            sd = m.state_dict(); m3 = build_method(name, arch, (1, 28, 28), C, seed=0, device=dev)
            m3.load_state_dict(sd); rt = torch.equal(m3.predict_members(xt), pm)
            print(f"{arch:12s} {name:14s} S={pm.shape[0]:2d} dev={pm.device} acc={acc:.3f} fit={tf:6.2f}s "
                  f"V_end={m.trace[-1]['variance']:.2e} trace_n={len(m.trace)} rerun_maxdiff={det} roundtrip={rt}",
                  flush=True)
        except Exception as e:
            print(f"{arch} {name} FAILED: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=4)
