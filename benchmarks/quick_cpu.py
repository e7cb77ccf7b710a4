"""A two-minute spot check of the CPU core at 1x1x144x144x128 (median of a few calls, no pytest).

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 PYTHONPATH=. python benchmarks/quick_cpu.py

The full, recorded comparison is benchmarks/run_cpu.sh; this one exists to take a reading quickly when
the machine is briefly idle. 'ref' rows go through the custom op with backend="reference" (the
backward then recomputes the forward), so they are slower than the plain reference functions.
"""
import time, torch, gradreg_fast as g, torch.nn.functional as F
from gradreg_fast import reference as R
from gradreg_fast.reference.mind import mind_ssc_convexadam
torch.manual_seed(0)
def t(fn, n=5):
    fn(); ts=[]
    for _ in range(n):
        s=time.perf_counter(); fn(); ts.append(time.perf_counter()-s)
    return sorted(ts)[len(ts)//2]*1e3
shape=(1,1,144,144,128)
v=torch.rand(shape)
vg=v.clone().requires_grad_()
def gm_fb(b):
    out=g.gradient_magnitude(vg, backend=b); out.sum().backward()
print('gm fwd cpu', t(lambda: g.gradient_magnitude(v, backend='cpu')), 'ref', t(lambda: g.gradient_magnitude(v, backend='reference')))
print('gm fb cpu', t(lambda: gm_fb('cpu')), 'ref', t(lambda: gm_fb('reference')))
img=torch.rand(shape); flow=torch.randn(1,3,*shape[2:])*2
D,H,W=shape[2:]
base = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in (D,H,W)], indexing='ij'))
loc = base + flow
grid = torch.stack([2*loc[:,2]/(W-1)-1, 2*loc[:,1]/(H-1)-1, 2*loc[:,0]/(D-1)-1], -1)
print('warp fwd cpu', t(lambda: g.warp(img, flow, backend='cpu')), 'grid_sample', t(lambda: F.grid_sample(img, grid, align_corners=True)))
ig=img.clone().requires_grad_(); fg=flow.clone().requires_grad_(); gg=grid.clone().requires_grad_()
def wfb():
    g.warp(ig, fg, backend='cpu').sum().backward()
def gsfb():
    F.grid_sample(ig, gg, align_corners=True).sum().backward()
print('warp fb cpu', t(wfb), 'grid_sample', t(gsfb))
print('ssc fwd cpu', t(lambda: g.mind_ssc(v, backend='cpu'),3), 'naive', t(lambda: mind_ssc_convexadam(v),3))
def sfb():
    g.mind_ssc(vg, backend='cpu').sum().backward()
def nfb():
    mind_ssc_convexadam(vg).sum().backward()
print('ssc fb cpu', t(sfb,3), 'naive', t(nfb,3))
f=torch.rand(shape)
def lfb():
    g.mind_loss(vg, f, backend='cpu').backward()
print('loss fb', t(lfb,3))
