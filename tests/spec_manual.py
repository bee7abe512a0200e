"""An independent implementation of SPEC.md section 4 and 4.1, for the tests.

Written from the SPEC's equations with explicit loops over classes and images and the
hand-derived gradients of section 4.1 (no autograd), in float64. The reference
(demul_fast.reference) must agree with it to float64 rounding: two implementations of
the same page, written differently.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-6


def _norm(v):
    n = math.sqrt(float((v * v).sum()))
    return v / max(n, EPS), n


def _normalize_backward(v_hat, dv_hat, n):
    """dv for v^ = v / max(||v||, eps) (SPEC 4.1)."""
    if n < EPS:
        return dv_hat / EPS
    return (dv_hat - v_hat * float((v_hat * dv_hat).sum())) / n


def head_forward_backward(T, A, X, y, tau, E=None, W=None, b=None, alpha=1.0, ls=0.0):
    """Return dict with loss, ce, dist, logits and the gradients dT, dA, dX (float64)."""
    T, A, X = T.double(), A.double(), X.double()
    C, M, D = T.shape
    B = X.shape[0]
    t_hat = torch.empty_like(T)
    n = [[0.0] * M for _ in range(C)]
    for c in range(C):
        for m in range(M):
            t_hat[c, m], n[c][m] = _norm(T[c, m])
    w = torch.empty_like(A)
    for c in range(C):
        ex = [math.exp(float(A[c, m]) - float(A[c].max())) for m in range(M)]
        s = sum(ex)
        for m in range(M):
            w[c, m] = ex[m] / s
    u = torch.zeros(C, D, dtype=torch.float64)
    u_hat = torch.empty(C, D, dtype=torch.float64)
    r = [0.0] * C
    for c in range(C):
        for m in range(M):
            u[c] += w[c, m] * t_hat[c, m]
        u_hat[c], r[c] = _norm(u[c])
    x_hat = torch.empty_like(X)
    xn = [0.0] * B
    for i in range(B):
        x_hat[i], xn[i] = _norm(X[i])
    s = torch.empty(B, C, dtype=torch.float64)
    for i in range(B):
        for c in range(C):
            s[i, c] = tau * float((x_hat[i] * u_hat[c]).sum())
    ce = 0.0
    G = torch.empty(B, C, dtype=torch.float64)
    for i in range(B):
        mx = float(s[i].max())
        z = sum(math.exp(float(s[i, c]) - mx) for c in range(C))
        lse = mx + math.log(z)
        ce += lse / B
        for c in range(C):
            q = (1 - ls) * (1.0 if c == int(y[i]) else 0.0) + ls / C
            ce -= q * float(s[i, c]) / B
            G[i, c] = (math.exp(float(s[i, c]) - lse) - q) / B
    # gradients of the CE part
    du_hat = torch.zeros(C, D, dtype=torch.float64)
    dx_hat = torch.zeros(B, D, dtype=torch.float64)
    for c in range(C):
        for i in range(B):
            du_hat[c] += tau * G[i, c] * x_hat[i]
            dx_hat[i] += tau * G[i, c] * u_hat[c]
    dX = torch.empty_like(X)
    for i in range(B):
        dX[i] = _normalize_backward(x_hat[i], dx_hat[i], xn[i])
    du = torch.empty(C, D, dtype=torch.float64)
    for c in range(C):
        du[c] = _normalize_backward(u_hat[c], du_hat[c], r[c])
    dw = torch.empty(C, M, dtype=torch.float64)
    for c in range(C):
        for m in range(M):
            dw[c, m] = float((du[c] * t_hat[c, m]).sum())
    dA = torch.empty_like(A)
    for c in range(C):
        mean = sum(float(w[c, k] * dw[c, k]) for k in range(M))
        for m in range(M):
            dA[c, m] = w[c, m] * (dw[c, m] - mean)
    dt_hat = torch.empty_like(T)
    for c in range(C):
        for m in range(M):
            dt_hat[c, m] = w[c, m] * du[c]
    dist = 0.0
    if E is not None:
        E, W = E.double(), W.double()
        for c in range(C):
            e_hat, _ = _norm(E[c])
            for m in range(M):
                z = W @ t_hat[c, m]
                if b is not None:
                    z = z + b.double()
                zn = math.sqrt(float((z * z).sum()))
                cos = float((z * e_hat).sum()) / max(zn, EPS)
                dist += (1 - cos) / (C * M)
                dz = -(alpha / (C * M)) * (e_hat - cos * z / zn) / zn
                dt_hat[c, m] += W.transpose(0, 1) @ dz
    dT = torch.empty_like(T)
    for c in range(C):
        for m in range(M):
            dT[c, m] = _normalize_backward(t_hat[c, m], dt_hat[c, m], n[c][m])
    return {
        "loss": ce + alpha * dist, "ce": ce, "dist": dist, "logits": s,
        "class_features": u_hat, "dT": dT, "dA": dA, "dX": dX,
    }
