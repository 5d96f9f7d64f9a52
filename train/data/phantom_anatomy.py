"""Abdominal anatomy of the CT phantoms, in mm (x to the patient's right, y anterior, z up; z = 0
about the level of the porta hepatis), painted into a `Canvas` with HU values from a per-case
contrast phase.

The organs that touch the liver (heart, stomach, spleen, IVC, right kidney, bowel) get nearly
liver density on purpose: telling them apart takes shape and context, not a threshold.
"""
from __future__ import annotations

import numpy as np

from .phantom_fields import Canvas, capsule_sdf, ellipse_sdf, ellipsoid_sdf


class T:
    """Tissue ids of the phantom's tissue map (the task's label map is derived from these)."""

    AIR, SUBCUT_FAT, MUSCLE, FAT = 0, 1, 2, 3
    BOWEL_WALL, BOWEL_CONTENT, BOWEL_AIR = 4, 5, 6
    STOMACH_WALL, STOMACH_CONTENT = 7, 8
    SPLEEN, LIVER, LIVER_VESSEL, LIVER_CYST, LIVER_TUMOUR, GALLBLADDER = 9, 10, 11, 12, 13, 14
    KIDNEY_CORTEX, KIDNEY_MEDULLA, RENAL_SINUS, RENAL_PELVIS, KIDNEY_CYST, KIDNEY_TUMOUR = 15, 16, 17, 18, 19, 20
    IVC, AORTA, VESSEL, HEART, HEART_BLOOD, LUNG = 21, 22, 23, 24, 25, 26
    BONE, MARROW, DISC, CANAL = 27, 28, 29, 30


LIVER_IDS = (T.LIVER, T.LIVER_VESSEL, T.LIVER_CYST)
KIDNEY_IDS = (T.KIDNEY_CORTEX, T.KIDNEY_MEDULLA, T.RENAL_PELVIS, T.KIDNEY_CYST)


def draw_palette(rng: np.random.Generator) -> dict:
    """HU of every tissue for one case. `phase` in [0, 1] runs from unenhanced to portal venous;
    the liver goes from about 55 to 110 HU and every enhancing structure scales with it."""
    p = float(rng.uniform(0.0, 1.0))
    liver = 55.0 + 55.0 * p + rng.normal(0.0, 3.0)
    blood = 40.0 + p * rng.uniform(110.0, 190.0)
    cortex = 40.0 + p * rng.uniform(110.0, 160.0)
    return {
        "phase": p,
        "liver": liver,
        "fat": rng.uniform(-115.0, -85.0),
        "muscle": rng.uniform(38.0, 55.0),
        "spleen": liver + rng.uniform(-8.0, 18.0),
        "heart": liver + rng.uniform(-10.0, 12.0),
        "heart_blood": blood,
        "ivc": liver + rng.uniform(-15.0, 12.0),
        "aorta": blood,
        "vessel_delta": -25.0 + 90.0 * p + rng.normal(0.0, 8.0),   # portal/hepatic veins vs liver
        "stomach_wall": liver + rng.uniform(-15.0, 5.0),
        "stomach_content": (rng.uniform(0.0, 20.0) if rng.uniform() < 0.5 else liver - rng.uniform(5.0, 25.0)),
        "bowel_wall": rng.uniform(30.0, 50.0) + 30.0 * p,
        "bowel_fluid": rng.uniform(0.0, 25.0),
        "cortex": cortex,
        "medulla": 35.0 + p * rng.uniform(40.0, 110.0),
        "urine": rng.uniform(0.0, 20.0),
        "water": rng.uniform(0.0, 20.0),
        "bone": rng.uniform(700.0, 1000.0),
        "marrow": rng.uniform(150.0, 280.0),
        "disc": rng.uniform(70.0, 95.0),
        "lung": rng.uniform(-880.0, -820.0),
    }


def _body(canvas: Canvas, rng, pal, tex) -> dict:
    g = canvas.grid
    z = g.z[None, None, :]
    a0, b0 = rng.uniform(135.0, 165.0), rng.uniform(100.0, 125.0)
    ph = rng.uniform(0, 2 * np.pi, 2)
    a = (a0 * (1.0 + 0.05 * np.sin(z / 90.0 + ph[0]))).astype(np.float32)
    b = (b0 * (1.0 + 0.05 * np.sin(z / 110.0 + ph[1]))).astype(np.float32)
    everything = (slice(None), slice(None), slice(None))
    f = ellipse_sdf(canvas.xw, canvas.yw, 0.0, 0.0, a, b)
    t_fat, t_muscle = rng.uniform(8.0, 35.0), rng.uniform(6.0, 12.0)
    canvas.paint(everything, f, T.SUBCUT_FAT, pal["fat"] + 6.0 * tex)
    canvas.paint(everything, f + t_fat, T.MUSCLE, pal["muscle"] + 4.0 * tex)
    f += t_fat + t_muscle
    canvas.paint(everything, f, T.FAT, pal["fat"] + 10.0 + 8.0 * tex)
    canvas.cavity = f                      # organs are clipped to the abdominal cavity
    spine_y = -b0 + t_fat + t_muscle + rng.uniform(35.0, 45.0)
    return {"a": a0, "b": b0, "spine_y": spine_y}


def _clip(canvas, box, f, margin=0.0):
    return np.maximum(f, canvas.cavity[box] + margin)


def _organ(canvas, center, semi, angle=0.0, tilt=(0.0, 0.0), shape=None, shape_amp=0.0, clip=True):
    """Box and signed distance of a deformed ellipsoid organ clipped to the cavity."""
    box = canvas.box_around(center, np.asarray(semi) * (1.0 + abs(tilt[0]) + abs(tilt[1])) + shape_amp + 12.0)
    if box is None:
        return None, None
    xw, yw, zz = canvas.coords(box)
    f = ellipsoid_sdf(xw, yw, zz, center, semi, angle, tilt)
    if shape is not None and shape_amp:
        f -= shape_amp * shape[box]
    if clip:
        f = _clip(canvas, box, f)
    return box, f


def _bowel(canvas, rng, pal, fields, body):
    g = canvas.grid
    box = g.box((-body["a"], body["spine_y"] + 15.0, -400.0), (body["a"], body["b"], 25.0))
    if box is None:
        return
    b1, b2 = fields["bowel"](box)
    zz = g.z[box[2]][None, None, :]
    # more bowel lower down, fading out towards the liver dome
    thr = np.float32(0.45) + np.clip((zz + 20.0) / 40.0, 0.0, 1.0).astype(np.float32)
    f_loop = (thr - b1) * 12.0                     # ~mm; loops where b1 > thr
    canvas.paint(box, f_loop, T.BOWEL_WALL, pal["bowel_wall"], where=canvas.tissue[box] == T.FAT)
    lumen = f_loop + rng.uniform(2.5, 4.0)
    content = np.where(b2 < -0.6, -60.0 + 40.0 * b2, pal["bowel_fluid"]).astype(np.float32)
    canvas.paint(box, lumen, T.BOWEL_CONTENT, content, where=canvas.tissue[box] == T.BOWEL_WALL)
    air = np.maximum(lumen, (1.0 - b2) * 10.0)
    canvas.paint(box, air, T.BOWEL_AIR, -1000.0, where=canvas.tissue[box] == T.BOWEL_CONTENT)


def paint_anatomy(canvas: Canvas, rng: np.random.Generator, pal: dict, fields: dict) -> dict:
    """Paint body, organs, vessels and bones; return the geometry the lesion painters need. The
    parts are painted, and draw from `rng`, in a fixed order: the same seed gives the same voxels."""
    tex, shape = fields["texture"], fields["shape"]
    body = _body(canvas, rng, pal, tex)
    sy = body["spine_y"]
    _bowel(canvas, rng, pal, fields, body)
    _thorax(canvas, rng.uniform, pal, tex, shape, sy)
    _stomach_and_spleen(canvas, rng.uniform, pal, tex, shape, sy)
    geo = {"body": body, "liver": _liver(canvas, rng.uniform, pal, tex, shape)}
    _gallbladder(canvas, rng.uniform, pal, tex, geo["liver"]["right"])
    geo["kidneys"] = _kidneys(canvas, rng.uniform, pal, tex, shape, sy)
    geo["ivc"] = _great_vessels(canvas, rng.uniform, pal, tex, sy, geo["kidneys"])
    _spine(canvas, rng, pal, sy, tex)
    return geo


def _thorax(canvas, u, pal, tex, shape, sy):
    """Lungs and heart above the diaphragm (the liver dome is painted over them)."""
    for side in (1.0, -1.0):
        box, f = _organ(canvas, (side * u(80, 95), sy + u(70, 90), u(120, 140)), (u(65, 80), u(80, 95), u(95, 115)),
                        shape=shape, shape_amp=4.0)
        if box is not None:
            canvas.paint(box, f, T.LUNG, pal["lung"] + 15.0 * tex[box])
    box, f = _organ(canvas, (u(-20, 0), u(20, 40), u(120, 135)), (u(60, 75), u(48, 60), u(55, 70)),
                    angle=u(-0.4, 0.1), shape=shape, shape_amp=3.0)
    if box is not None:
        canvas.paint(box, f, T.HEART, pal["heart"] + 3.0 * tex[box])
        canvas.paint(box, f + u(9, 14), T.HEART_BLOOD, pal["heart_blood"] + 4.0 * tex[box])


def _stomach_and_spleen(canvas, u, pal, tex, shape, sy):
    """The stomach in the left upper quadrant (air-fluid level anteriorly), and the spleen."""
    sc = (u(-60, -40), u(20, 40), u(10, 30))
    box, f = _organ(canvas, sc, (u(40, 55), u(32, 45), u(45, 60)), angle=u(-0.5, 0.5), shape=shape, shape_amp=5.0)
    if box is not None:
        canvas.paint(box, f, T.STOMACH_WALL, pal["stomach_wall"] + 3.0 * tex[box])
        inner = f + u(4, 8)
        canvas.paint(box, inner, T.STOMACH_CONTENT, pal["stomach_content"] + 5.0 * tex[box])
        level = sc[1] + u(0.0, 30.0)
        air = np.maximum(inner, level - canvas.yw[box])
        canvas.paint(box, air, T.BOWEL_AIR, -1000.0)
    box, f = _organ(canvas, (u(-100, -80), sy + u(35, 55), u(5, 25)), (u(28, 38), u(48, 60), u(45, 60)),
                    angle=u(-0.7, -0.3), shape=shape, shape_amp=4.0)
    if box is not None:
        canvas.paint(box, f, T.SPLEEN, pal["spleen"] + 3.0 * tex[box])


def _liver(canvas, u, pal, tex, shape) -> dict:
    """A large right lobe and a thinner left lobe reaching over the stomach; returns both lobes'
    (centre, semi-axes)."""
    right = ((u(55, 75), u(0, 20), u(-10, 5)), (u(75, 92), u(75, 95), u(70, 88)))
    left = ((u(-30, -5), u(40, 60), u(15, 35)), (u(55, 75), u(28, 40), u(35, 48)))
    tilt = (u(-0.15, 0.15), u(-0.15, 0.15))
    lo = [min(r - s, l - t) - 20.0 for r, s, l, t in zip(right[0], right[1], left[0], left[1])]
    hi = [max(r + s, l + t) + 20.0 for r, s, l, t in zip(right[0], right[1], left[0], left[1])]
    box = canvas.grid.box(lo, hi)
    if box is not None:
        xw, yw, zz = canvas.coords(box)
        f = np.minimum(ellipsoid_sdf(xw, yw, zz, *right, angle=u(-0.2, 0.2), tilt=tilt),
                       ellipsoid_sdf(xw, yw, zz, *left, angle=u(-0.4, 0.2), tilt=tilt))
        f -= 6.0 * shape[box]
        f = _clip(canvas, box, f, margin=1.0)
        canvas.paint(box, f, T.LIVER, pal["liver"] + 3.0 * tex[box])
    return {"right": right, "left": left}


def _gallbladder(canvas, u, pal, tex, right):
    """In most cases, the gallbladder in the fossa under the right lobe (fluid, background)."""
    if u() < 0.7:
        gc = (right[0][0] - u(25, 45), right[0][1] + u(25, 45), right[0][2] - u(35, 55))
        box, f = _organ(canvas, gc, (u(12, 18), u(15, 22), u(25, 40)), angle=u(-0.6, 0.6))
        if box is not None:
            canvas.paint(box, f, T.GALLBLADDER, pal["water"] + 2.0 * tex[box])


def _kidneys(canvas, u, pal, tex, shape, sy) -> list:
    """Enhancing cortex, medulla, renal sinus fat and pelvis at the medial hilum; returns each
    painted kidney's geometry."""
    kidneys = []
    zr = u(-70, -50)
    for side, cz in ((1.0, zr), (-1.0, zr + u(8, 20))):
        center = (side * u(62, 78), sy + u(20, 32), cz)
        semi = (u(24, 30), u(28, 34), u(48, 58))
        angle = side * u(0.3, 0.7)
        box, f = _organ(canvas, center, semi, angle=angle, tilt=(side * u(0.0, 0.15), 0.0),
                        shape=shape, shape_amp=2.0)
        if box is None:
            continue
        canvas.paint(box, f, T.KIDNEY_CORTEX, pal["cortex"] + 4.0 * tex[box])
        canvas.paint(box, f + u(6, 9), T.KIDNEY_MEDULLA, pal["medulla"] + 6.0 * tex[box])
        xw, yw, zz = canvas.coords(box)
        hilum = (center[0] - side * semi[0] * 0.55, center[1] + semi[1] * 0.25, center[2])
        sinus = ellipsoid_sdf(xw, yw, zz, hilum, (semi[0] * 0.45, semi[1] * 0.35, semi[2] * 0.45), angle)
        canvas.paint(box, np.maximum(sinus, f), T.RENAL_SINUS, pal["fat"] + 20.0)
        pelvis = ellipsoid_sdf(xw, yw, zz, hilum, (semi[0] * 0.3, semi[1] * 0.22, semi[2] * 0.3), angle)
        canvas.paint(box, pelvis, T.RENAL_PELVIS, pal["urine"])
        kidneys.append({"center": center, "semi": semi, "angle": angle, "side": side, "hilum": hilum})
    return kidneys


def _great_vessels(canvas, u, pal, tex, sy, kidneys) -> tuple:
    """IVC and aorta along the spine, and the renal veins into the IVC; returns the IVC's (x, y, radius)."""
    ivc = (u(18, 30), sy + u(40, 50))
    aorta = (u(-18, -6), sy + u(28, 36))
    r_ivc, r_ao = u(9, 13), u(9, 13)
    for (cx, cy), r, tid, hu in ((ivc, r_ivc, T.IVC, pal["ivc"]), (aorta, r_ao, T.AORTA, pal["aorta"])):
        box = canvas.grid.box((cx - 3 * r, cy - 3 * r, -1e4), (cx + 3 * r, cy + 3 * r, 95.0))
        if box is not None:
            xw, yw, zz = canvas.coords(box)
            f = ellipse_sdf(xw, yw, cx, cy, r * 1.15, r * 0.9) + np.maximum(zz - 90.0, 0.0)
            canvas.paint(box, f, tid, hu + 2.0 * tex[box])
    for k in kidneys:
        p0 = (ivc[0], ivc[1], k["hilum"][2] + 5.0)
        p1 = k["hilum"]
        box = canvas.box_around(((p0[0] + p1[0]) / 2, (p0[1] + p1[1]) / 2, (p0[2] + p1[2]) / 2),
                                (abs(p0[0] - p1[0]) / 2 + 12, abs(p0[1] - p1[1]) / 2 + 12, 15.0))
        if box is not None:
            xw, yw, zz = canvas.coords(box)
            f = capsule_sdf(xw, yw, zz, p0, p1, 5.0, 4.0)
            canvas.paint(box, f, T.VESSEL, pal["ivc"] + 10.0, where=canvas.tissue_in(box, (T.FAT, T.RENAL_SINUS)))
    return (ivc[0], ivc[1], r_ivc)


def _column(canvas, cx, cy, a, b, z_top=1e4):
    """Box and signed distance of a vertical elliptic column ending at height z_top."""
    box = canvas.grid.box((cx - a - 12.0, cy - b - 12.0, -1e4), (cx + a + 12.0, cy + b + 12.0, z_top + 5.0))
    if box is None:
        return None, None
    xw, yw, zz = canvas.coords(box)
    f = ellipse_sdf(xw, yw, cx, cy, a, b)
    if z_top < 1e4:
        f = np.maximum(f, zz - z_top)
    return box, f


def _spine(canvas, rng, pal, sy, tex):
    u = rng.uniform
    # paraspinal and psoas muscles
    for side in (1.0, -1.0):
        for (cx, cy, a, b, top) in ((side * u(26, 32), sy - 32.0, u(18, 24), u(20, 26), 1e4),
                                    (side * u(32, 40), sy + 5.0, u(12, 18), u(12, 18), -40.0)):
            box, f = _column(canvas, cx, cy, a, b, top)
            if box is not None:
                canvas.paint(box, f, T.MUSCLE, pal["muscle"] + 4.0 * tex[box])
    # vertebral body: cortical shell, marrow, discs every ~30 mm
    rx, ry = u(18, 23), u(15, 19)
    box, body = _column(canvas, 0.0, sy, rx, ry)
    period, phase, thick = u(28, 33), u(0, 30), u(6, 9)
    if box is not None:
        canvas.paint(box, body, T.BONE, pal["bone"])
        canvas.paint(box, body + u(2.0, 3.0), T.MARROW, pal["marrow"] + 15.0 * tex[box])
        zz = canvas.grid.z[box[2]][None, None, :]
        disc_z = np.abs(((zz - phase) % period) - period / 2) - (period / 2 - thick / 2)
        canvas.paint(box, np.maximum(body + 0.5, -disc_z), T.DISC, pal["disc"] + 3.0 * tex[box])
    # neural arch, canal and spinous process
    box, ring = _column(canvas, 0.0, sy - ry - 10.0, 15.0, 12.0)
    if box is not None:
        canvas.paint(box, ring, T.BONE, 0.6 * pal["bone"])
        canvas.paint(box, ring + 4.0, T.CANAL, 20.0)
    box, spinous = _column(canvas, 0.0, sy - ry - 32.0, 5.0, 14.0)
    if box is not None:
        canvas.paint(box, spinous, T.BONE, 0.6 * pal["bone"])
