"""What makes the phantom task hard: intrahepatic vessel trees, cysts (labelled as organ, the
way LiTS and KiTS19 label them) and tumours of varied appearance (hypodense with blurred edges,
hyperdense, rim-enhancing, lobulated; kidney tumours with necrotic cores and enhancing rims).
"""
from __future__ import annotations

import numpy as np

from .phantom_anatomy import KIDNEY_IDS, LIVER_IDS, T
from .phantom_fields import Canvas, capsule_sdf, ellipsoid_sdf


BOWEL_IDS = (T.BOWEL_WALL, T.BOWEL_CONTENT, T.BOWEL_AIR)


def _log_uniform(rng, lo, hi):
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / (np.linalg.norm(v) + 1e-12)


def _turn(rng, d, max_angle):
    """Rotate direction d by a random angle up to max_angle (radians) about a random axis."""
    perp = _unit(np.cross(d, rng.standard_normal(3)))
    ang = rng.uniform(0.35, 1.0) * max_angle
    return _unit(np.cos(ang) * d + np.sin(ang) * perp)


def _vessel_tree(canvas, rng, root, directions, r0, length, generations, hu, inside_id, outside_id=None):
    """Paint a branching tree of tapered tubes; inside the liver they stay liver-labelled."""
    stack = [(np.asarray(root, float), _unit(d), r0, length, 0) for d in directions]
    while stack:
        p0, d, r, ln, gen = stack.pop()
        p1 = p0 + d * ln
        r1 = r * 0.78
        box = canvas.box_around((p0 + p1) / 2, np.abs(p1 - p0) / 2 + r + 3.0)
        if box is not None:
            xw, yw, zz = canvas.coords(box)
            f = capsule_sdf(xw, yw, zz, p0, p1, r, r1)
            canvas.paint(box, f, inside_id, hu, edge=max(canvas.pixel, 1.0),
                         where=canvas.tissue_in(box, (T.LIVER, inside_id)))
            if outside_id is not None:
                canvas.paint(box, f, outside_id, hu, where=canvas.tissue_in(box, (T.FAT,)))
        if gen + 1 < generations:
            for _ in range(2):
                stack.append((p1, _turn(rng, d, 0.8), r1 * 0.85, ln * rng.uniform(0.7, 0.95), gen + 1))


def _sample_inside(canvas, rng, lo, hi, ids, clearance, tries=200):
    """A random point in the mm box [lo, hi] whose surroundings (+-clearance) are tissue `ids`."""
    g = canvas.grid
    for _ in range(tries):
        p = rng.uniform(lo, hi)
        pts = [p] + [p + np.array(o) * clearance for o in
                     ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))]
        ok = True
        for q in pts:
            idx = [int(np.argmin(np.abs(a - v))) for a, v in zip((g.x, g.y, g.z), q)]
            if not (g.x[0] - 1 <= q[0] <= g.x[-1] + 1 and g.y[0] - 1 <= q[1] <= g.y[-1] + 1
                    and g.z[0] - 1 <= q[2] <= g.z[-1] + 1) or canvas.tissue[tuple(idx)] not in ids:
                ok = False
                break
        if ok:
            return p
    return None


def _lobulated(canvas, rng, center, r, tex):
    """Box and signed distance of a lobulated lesion: a main ellipsoid plus 0-3 lobules."""
    box = canvas.box_around(center, 2.0 * r + 4.0)
    if box is None:
        return None, None
    xw, yw, zz = canvas.coords(box)
    f = ellipsoid_sdf(xw, yw, zz, center, r * rng.uniform(0.8, 1.2, 3), rng.uniform(0, np.pi))
    for _ in range(rng.integers(0, 4)):
        off = _unit(rng.standard_normal(3)) * r * rng.uniform(0.5, 0.9)
        rl = r * rng.uniform(0.35, 0.7)
        f = np.minimum(f, ellipsoid_sdf(xw, yw, zz, np.asarray(center) + off, (rl, rl, rl)))
    f -= min(2.0, 0.15 * r) * tex[box]
    return box, f


def paint_liver_vessels_and_cysts(canvas: Canvas, rng, pal, geo, tex) -> None:
    (rc, rs), (lc, ls) = geo["liver"]["right"], geo["liver"]["left"]
    hu = pal["liver"] + pal["vessel_delta"]
    hilum = (rc[0] - rs[0] * 0.45, rc[1] + rng.uniform(-10, 10), rc[2] - rng.uniform(5, 20))
    _vessel_tree(canvas, rng, hilum, [(1.0, 0.1, 0.15), (-1.0, 0.6, 0.25)], rng.uniform(6, 8),
                 rng.uniform(28, 40), 4, hu, T.LIVER_VESSEL, T.VESSEL)
    ivc_x, ivc_y, _ = geo["ivc"]
    top = (ivc_x, ivc_y + 5.0, rc[2] + rs[2] * 0.55)
    _vessel_tree(canvas, rng, top, [(1.0, 0.3, -0.7), (0.2, 0.9, -0.6), (-0.8, 0.8, -0.5)], rng.uniform(5, 7),
                 rng.uniform(30, 45), 3, hu + rng.normal(0, 8), T.LIVER_VESSEL)
    lo = np.minimum(np.subtract(rc, rs), np.subtract(lc, ls))
    hi = np.maximum(np.add(rc, rs), np.add(lc, ls))
    for _ in range(min(5, rng.poisson(1.2))):
        r = _log_uniform(rng, 2.0, 20.0)
        c = _sample_inside(canvas, rng, lo, hi, (T.LIVER, T.LIVER_VESSEL), 0.8 * r)
        if c is None:
            continue
        box = canvas.box_around(c, 1.3 * r + 2.0)
        if box is None:         # thick slices: no voxel centre within reach of this small cyst
            continue
        xw, yw, zz = canvas.coords(box)
        f = ellipsoid_sdf(xw, yw, zz, c, r * rng.uniform(0.85, 1.15, 3), rng.uniform(0, np.pi))
        canvas.paint(box, f, T.LIVER_CYST, pal["water"] + 2.0 * tex[box], where=canvas.tissue_in(box, LIVER_IDS))


def paint_liver_tumours(canvas: Canvas, rng, pal, geo, tex, min_diameter_mm: float = 0.0,
                        contrast_scale: float = 1.0) -> list[dict]:
    """Several lesions 3-40 mm across (at least `min_diameter_mm`), or none (20% of cases).
    `contrast_scale` multiplies each lesion's drawn HU difference to the liver (the random draws
    are the same, so a case keeps its lesions and only their conspicuity changes)."""
    (rc, rs), (lc, ls) = geo["liver"]["right"], geo["liver"]["left"]
    lo = np.minimum(np.subtract(rc, rs), np.subtract(lc, ls))
    hi = np.maximum(np.add(rc, rs), np.add(lc, ls))
    n = 0 if rng.uniform() < 0.2 else min(8, 1 + rng.poisson(2.0))
    liver = pal["liver"]
    out = []
    for _ in range(n):
        r = _log_uniform(rng, max(1.5, min_diameter_mm / 2), 20.0)
        c = _sample_inside(canvas, rng, lo, hi, (T.LIVER, T.LIVER_VESSEL, T.LIVER_TUMOUR), 0.6 * r)
        if c is None:
            continue
        box, f = _lobulated(canvas, rng, c, r, tex)
        if box is None:
            continue
        where = canvas.tissue_in(box, LIVER_IDS + (T.LIVER_TUMOUR,))
        kind = rng.choice(["hypodense", "hyperdense", "rim"], p=[0.45, 0.25, 0.30])
        contrast = contrast_scale * (rng.uniform(10.0, 40.0) if kind == "hypodense" else rng.uniform(15.0, 40.0))
        texture = rng.uniform(3.0, 8.0) * tex[box]
        if kind == "hypodense":
            canvas.paint(box, f, T.LIVER_TUMOUR, liver - contrast + texture, edge=min(rng.uniform(2, 4), r), where=where)
        elif kind == "hyperdense":
            canvas.paint(box, f, T.LIVER_TUMOUR, liver + contrast + texture, edge=min(rng.uniform(1, 2), r), where=where)
        else:
            canvas.paint(box, f, T.LIVER_TUMOUR, liver + contrast + texture, edge=min(rng.uniform(1, 2), r), where=where)
            core = f + max(1.0, 0.25 * r)
            canvas.paint(box, core, T.LIVER_TUMOUR, liver - contrast_scale * rng.uniform(15, 40) + texture, edge=1.5,
                         where=where)
        out.append({"center_mm": [float(v) for v in c], "radius_mm": r, "kind": str(kind), "contrast_hu": contrast})
    return out


def _kidney_point(rng, k, scale):
    """A point at `scale` times the surface radius of kidney k, in a random direction."""
    d = _unit(rng.standard_normal(3))
    co, si = np.cos(k["angle"]), np.sin(k["angle"])
    lx, ly, lz = d * np.asarray(k["semi"]) * scale
    return np.asarray(k["center"]) + np.array([co * lx - si * ly, si * lx + co * ly, lz])


def paint_kidney_cysts(canvas: Canvas, rng, pal, geo, tex) -> None:
    for k in geo["kidneys"]:
        for _ in range(min(2, rng.poisson(0.6))):
            r = _log_uniform(rng, 3.0, 22.0)
            c = _kidney_point(rng, k, rng.uniform(0.5, 1.0))
            box = canvas.box_around(c, 1.3 * r + 2.0)
            if box is None:
                continue
            xw, yw, zz = canvas.coords(box)
            f = ellipsoid_sdf(xw, yw, zz, c, r * rng.uniform(0.85, 1.15, 3))
            where = canvas.tissue_in(box, KIDNEY_IDS + (T.FAT, T.RENAL_SINUS) + BOWEL_IDS)
            canvas.paint(box, f, T.KIDNEY_CYST, pal["water"] + 2.0 * tex[box], where=where)


def paint_kidney_tumours(canvas: Canvas, rng, pal, geo, tex, min_diameter_mm: float = 0.0) -> list[dict]:
    """Heterogeneous renal masses 12-80 mm across (at least `min_diameter_mm`), often exophytic:
    enhancing rim, solid part, necrotic core."""
    if not geo["kidneys"]:
        return []
    n = 0 if rng.uniform() < 0.1 else (2 if rng.uniform() < 0.2 else 1)
    out = []
    p = pal["phase"]
    for _ in range(n):
        k = geo["kidneys"][rng.integers(len(geo["kidneys"]))]
        r = _log_uniform(rng, max(6.0, min_diameter_mm / 2), 40.0)
        c = _kidney_point(rng, k, rng.uniform(0.6, 1.1))
        box, f = _lobulated(canvas, rng, c, r, tex)
        if box is None:
            continue
        # exophytic masses push fat and bowel aside (they are not cut by them)
        where = canvas.tissue_in(box, KIDNEY_IDS + (T.FAT, T.RENAL_SINUS, T.KIDNEY_TUMOUR, T.VESSEL) + BOWEL_IDS)
        solid = 40.0 + p * rng.uniform(30.0, 110.0)
        texture = rng.uniform(8.0, 15.0) * tex[box]
        rim = solid + p * rng.uniform(20.0, 60.0)
        canvas.paint(box, f, T.KIDNEY_TUMOUR, rim + texture, edge=1.5, where=where)
        canvas.paint(box, f + rng.uniform(2.0, 4.0), T.KIDNEY_TUMOUR, solid + texture, edge=2.0, where=where)
        necrotic = r > 12.0 and rng.uniform() < 0.6
        if necrotic:
            core = f + 0.45 * r - 3.0 * tex[box]
            canvas.paint(box, core, T.KIDNEY_TUMOUR, rng.uniform(10.0, 30.0) + 0.5 * texture, edge=2.0, where=where)
        out.append({"center_mm": [float(v) for v in c], "radius_mm": r, "kind": "necrotic" if necrotic else "solid",
                    "solid_hu": solid})
    return out
