import time, torch
@torch.library.custom_op("t::f", mutates_args=("y",))
def f(y: torch.Tensor, x: torch.Tensor, k: int) -> None:
    return None
@f.register_fake
def _(y, x, k): return None
def direct(y, x, k): return None
y=torch.zeros(16,576,dtype=torch.bfloat16); x=torch.zeros(16,576,dtype=torch.bfloat16)
for name, fn in (("custom op eager", f), ("direct", direct)):
    for _ in range(200): fn(y,x,1)
    t=time.perf_counter(); n=5000
    for _ in range(n): fn(y,x,1)
    print(name, round((time.perf_counter()-t)/n*1e6,1), "us")
def g(y,x):
    y = y*2
    f(y,x,1)
    return y+1
def h(y,x):
    y = y*2
    return y+1
for name, fn in (("compiled with op", torch.compile(g, dynamic=True)), ("compiled without", torch.compile(h, dynamic=True))):
    for _ in range(50): fn(y,x)
    t=time.perf_counter(); n=2000
    for _ in range(n): fn(y,x)
    print(name, round((time.perf_counter()-t)/n*1e6,1), "us")
