import json,torch
torch.set_default_dtype(torch.float64)
d=json.load(open('/work/main/tests/data/looksam_peer.json'))
for c in d['cases']:
  for epsv in [0.0,1e-8]:
    A=torch.tensor(c['a']);b=torch.tensor(c['b']);w=torch.tensor(c['init'])
    k=c['k'];al=c['alpha'];rho=c['rho'];ad=c['adaptive']
    kw=c['base_kwargs']
    p=torch.nn.Parameter(w.clone())
    opt=(torch.optim.SGD if c['base']=='SGD' else torch.optim.Adam)([p],**kw)
    gv=None; worst=0
    for t in range(c['steps']):
      with torch.no_grad():
        g=A@p-b
        if t%k==0:
          T=p.abs() if ad else torch.ones_like(p)
          e=rho*T*T*g/((T*g).norm()+1e-12)
          gs=A@(p+e)-b
          gv=gs-(g@gs)/(g@g)*g
          dd=gs
        else:
          dd=g+al*g.norm()/(gv.norm()+epsv)*gv
      p.grad=dd.clone(); opt.step()
      ex=torch.tensor(c['expected'][t])
      worst=max(worst,((p.detach()-ex).abs()/ex.abs().clamp_min(1e-3)).max().item())
    print(c['name'],epsv,worst, gv.norm().item())
