"""Small synthetic semi-supervised 3D segmentation datasets in nnU-Net v2's raw layout.

``generate_dataset`` writes ``DatasetXXX_CAMLSynthetic<Task>/`` with a few labeled training cases
(``imagesTr`` + ``labelsTr``), unlabeled images (``imagesTrUnlabeled``, never a label anywhere) and
labeled test cases (``imagesTs`` + ``labelsTs``). The tasks are toys that fit a CPU demo, built so
that a handful of labeled scans do not solve them alone:

``atrium`` (MRI-like blood pools)
    Label: one smooth, irregular blob (an ellipsoid deformed by low-frequency noise) with two to four
    tapering pulmonary-vein stubs attached. Unlabeled look-alikes, blood pools like the label: a
    ventricle-like blob with a trabeculated (speckled) interior inside a muscular wall, and an
    aorta-like thick tube with a wall that crosses the whole volume; fat-like patches and dark
    lung-like regions clutter the background.
``vessel`` (CT- or MR-angiography-like)
    Label: a branching tree of curved tubes whose radius tapers from root to tips. Unlabeled
    look-alikes: a thick tube of constant calibre crossing the volume, one or two thin straight
    unbranched tubes of constant calibre, a curved bone-like sheet, and sometimes a closed ring.

Every case draws one of eight (atrium) or five (vessel) **acquisition protocols**
(``_ATRIUM_PROTOCOLS``, ``_VESSEL_PROTOCOLS``) that change what nnU-Net's intensity augmentation cannot undo: which structures are bright (walls dark
or enhanced above the blood, fat bright or suppressed, bone brighter or darker than the vessels, veins
dimmer or brighter than arteries), contrast, inhomogeneity, blur and noise. A handful of labeled cases
sees only some protocols, the unlabeled and test cases see all of them, to make the tasks label-bound
(``benchmarks/ssl_gain.py --calibrate`` measures it; README: the vessel task is, 4 labeled cases stay 12.6 Dice
points below all 36; the atrium task is not yet: 3.8 points at the benchmark's patch, 5.6 at 32x40x40 over
four seeds). Within a protocol, every case still varies in shape, position, contrast, noise and bias field, and
no global intensity threshold separates the label (the tests check that the best threshold's Dice is low).
Geometry is drawn in millimetres on the voxel grid given by ``shape`` and ``spacing`` (both in numpy z, y, x order)
and sized relative to the default 48 x 64 x 64 mm field of view.

Case ``i`` of a group (labeled, unlabeled, test) depends only on ``seed``, the task, the group and
``i``, so changing one group's size leaves the cases of the other groups unchanged.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Callable, Dict, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

__all__ = ["TASKS", "GROUPS", "dataset_name", "make_case", "generate_dataset"]

_REFERENCE_EXTENT_MM = (48.0, 64.0, 64.0)

# folder names and the integer that seeds each group's cases
GROUPS: Dict[str, Tuple[str, int]] = {
    "labeled": ("imagesTr", 1),
    "unlabeled": ("imagesTrUnlabeled", 2),
    "test": ("imagesTs", 3),
}
_CASE_PREFIX = {"labeled": "lab", "unlabeled": "unl", "test": "ts"}


# ------------------------------------------------------------------------------------------------
# geometry helpers (all lengths in mm, arrays in numpy z, y, x order)
# ------------------------------------------------------------------------------------------------
class _Grid:
    """Voxel-centre coordinates of a volume in mm, as broadcastable open grids."""

    def __init__(self, shape: Sequence[int], spacing: Sequence[float]):
        self.shape = tuple(int(s) for s in shape)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.extent = np.asarray(self.shape) * self.spacing
        self.axes = [np.arange(n, dtype=np.float32) * np.float32(sp) for n, sp in zip(self.shape, self.spacing)]
        self.z = self.axes[0][:, None, None]
        self.y = self.axes[1][None, :, None]
        self.x = self.axes[2][None, None, :]
        # one-voxel partial-volume ramp
        self.edge = float(self.spacing.min())
        ref = np.prod(_REFERENCE_EXTENT_MM) ** (1 / 3)
        self.scale = float(np.prod(self.extent) ** (1 / 3) / ref)

    def bbox(self, lo_mm: np.ndarray, hi_mm: np.ndarray) -> Tuple[slice, slice, slice] | None:
        lo = np.maximum(np.floor(lo_mm / self.spacing).astype(int), 0)
        hi = np.minimum(np.ceil(hi_mm / self.spacing).astype(int) + 1, self.shape)
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _empty_sdf(grid: _Grid) -> np.ndarray:
    return np.full(grid.shape, 1e4, dtype=np.float32)


def _paint_segment(sdf: np.ndarray, grid: _Grid, p0, p1, r0: float, r1: float) -> None:
    """Union (min) of ``sdf`` with a tapered capsule from p0 (radius r0) to p1 (radius r1)."""
    p0 = np.asarray(p0, dtype=np.float64)
    p1 = np.asarray(p1, dtype=np.float64)
    pad = max(r0, r1) + 2 * grid.edge
    sl = grid.bbox(np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad)
    if sl is None:
        return
    z = grid.axes[0][sl[0]][:, None, None] - np.float32(p0[0])
    y = grid.axes[1][sl[1]][None, :, None] - np.float32(p0[1])
    x = grid.axes[2][sl[2]][None, None, :] - np.float32(p0[2])
    d = (p1 - p0).astype(np.float32)
    length2 = float(d @ d)
    if length2 < 1e-12:
        t = np.zeros((1, 1, 1), dtype=np.float32)
    else:
        t = np.clip((z * d[0] + y * d[1] + x * d[2]) / np.float32(length2), 0, 1)
    dist = np.sqrt((z - t * d[0]) ** 2 + (y - t * d[1]) ** 2 + (x - t * d[2]) ** 2)
    np.minimum(sdf[sl], dist - (np.float32(r0) + np.float32(r1 - r0) * t), out=sdf[sl])


def _paint_polyline(sdf: np.ndarray, grid: _Grid, points: np.ndarray, radii: np.ndarray) -> None:
    for i in range(len(points) - 1):
        _paint_segment(sdf, grid, points[i], points[i + 1], float(radii[i]), float(radii[i + 1]))


def _occupancy(sdf: np.ndarray, grid: _Grid) -> np.ndarray:
    """Partial-volume fraction from a signed distance (>= 0.5 exactly where sdf <= 0)."""
    return np.clip(0.5 - sdf / np.float32(grid.edge), 0, 1)


def _smooth_noise(rng: np.random.Generator, shape: Tuple[int, ...], corr_vox: float) -> np.ndarray:
    """Zero-mean, unit-std random field with correlation length of about ``corr_vox`` voxels: a sum of
    Gaussian bumps with random weights on a coarse lattice, evaluated separably (three small matmuls)."""
    width = corr_vox / 2
    if corr_vox < 3:  # fine texture: blurring white noise is cheaper
        field = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), width, mode="wrap")
        return (field - field.mean()) / max(float(field.std()), 1e-8)
    step = width
    kernels = []
    for n in shape:
        centers = np.arange(-2 * width, n - 1 + 2 * width + step, step, dtype=np.float32)
        x = np.arange(n, dtype=np.float32)
        kernels.append(np.exp(-0.5 * ((x[:, None] - centers[None, :]) / np.float32(width)) ** 2))
    field = rng.standard_normal([k.shape[1] for k in kernels], dtype=np.float32)
    # plain einsum (no BLAS): these products are small and BLAS threads only add overhead here
    field = np.einsum("abc,zc->abz", field, kernels[2])
    field = np.einsum("abz,yb->ayz", field, kernels[1])
    field = np.einsum("ayz,xa->xyz", field, kernels[0])
    field -= field.mean()
    std = field.std()
    return field / (std if std > 0 else 1)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(np.linalg.norm(v), 1e-8)


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    return _unit(rng.standard_normal(3))


def _blob_sdf(rng: np.random.Generator, grid: _Grid, center, semi_axes, roughness: float) -> np.ndarray:
    """Approximate signed distance (mm) of a randomly rotated ellipsoid deformed by smooth noise."""
    rot = _random_rotation(rng)
    dz, dy, dx = grid.z - np.float32(center[0]), grid.y - np.float32(center[1]), grid.x - np.float32(center[2])
    semi = np.asarray(semi_axes, dtype=np.float32)
    r2 = np.zeros(grid.shape, dtype=np.float32)
    for k in range(3):
        local = dz * np.float32(rot[k, 0]) + dy * np.float32(rot[k, 1]) + dx * np.float32(rot[k, 2])
        r2 += (local / semi[k]) ** 2
    corr = max(4.0, float(semi.mean() / grid.spacing.mean()) * 0.8)
    f = np.sqrt(r2) + np.float32(roughness) * _smooth_noise(rng, grid.shape, corr)
    return (f - 1) * np.float32(semi.mean())


def _random_walk_tube(rng: np.random.Generator, start, direction, length: float, step: float,
                      wiggle: float) -> np.ndarray:
    pts = [np.asarray(start, dtype=np.float64)]
    d = _unit(np.asarray(direction, dtype=np.float64))
    for _ in range(max(1, int(np.ceil(length / step)))):
        d = _unit(d + wiggle * rng.standard_normal(3))
        pts.append(pts[-1] + step * d)
    return np.asarray(pts)


def _crossing_line(rng: np.random.Generator, grid: _Grid, margin: float) -> Tuple[np.ndarray, np.ndarray]:
    """A point inside the volume and a direction roughly along a random axis."""
    axis = int(rng.integers(3))
    direction = np.zeros(3)
    direction[axis] = 1.0
    direction = _unit(direction + 0.35 * rng.standard_normal(3) * (np.arange(3) != axis))
    point = rng.uniform(np.minimum(margin, grid.extent / 2), np.maximum(grid.extent - margin, grid.extent / 2))
    return point, direction


def _crossing_tube_sdf(rng: np.random.Generator, grid: _Grid, radius: float, margin: float) -> np.ndarray:
    point, direction = _crossing_line(rng, grid, margin)
    half = float(np.linalg.norm(grid.extent))
    a = _random_walk_tube(rng, point, direction, half, 4.0 * grid.scale, 0.06)
    b = _random_walk_tube(rng, point, -direction, half, 4.0 * grid.scale, 0.06)
    pts = np.concatenate([b[::-1], a[1:]])
    sdf = _empty_sdf(grid)
    _paint_polyline(sdf, grid, pts, np.full(len(pts), radius))
    return sdf


def _lookup(sdf: np.ndarray, grid: _Grid, point) -> float:
    """Value of ``sdf`` at the voxel nearest to ``point`` (mm); outside the volume, the nearest border voxel."""
    idx = np.clip(np.rint(np.asarray(point) / grid.spacing).astype(int), 0, np.asarray(grid.shape) - 1)
    return float(sdf[tuple(idx)])


def _apart(sdf_a: np.ndarray, sdf_b: np.ndarray, gap: float) -> bool:
    return not np.any((sdf_a < gap) & (sdf_b < gap))


def _compose(image: np.ndarray, occ: np.ndarray, value) -> None:
    image *= 1 - occ
    image += occ * value


def _blur(image: np.ndarray, grid: _Grid, blur_mm: float) -> np.ndarray:
    """Scanner point-spread function."""
    return gaussian_filter(image, [blur_mm / sp for sp in grid.spacing], mode="nearest")


# ------------------------------------------------------------------------------------------------
# tasks
# ------------------------------------------------------------------------------------------------
def _atrium_case(rng: np.random.Generator, grid: _Grid,
                 protocols: Sequence[dict] = None) -> Tuple[np.ndarray, np.ndarray, str]:
    s = grid.scale
    ext = grid.extent
    shape = grid.shape

    # --- label: atrium body + pulmonary-vein stubs
    semi_a = s * rng.uniform([7.5, 9.0, 9.0], [11.0, 14.0, 14.0])
    center_a = rng.uniform(0.36, 0.64, 3) * ext
    sdf_atrium = _blob_sdf(rng, grid, center_a, semi_a, rng.uniform(0.12, 0.25))

    # --- ventricle-like distractor next to it, same brightness, textured, with a wall
    semi_v = semi_a * rng.uniform(0.85, 1.15, 3)
    wall_mm = s * rng.uniform(2.0, 3.5)
    sdf_ventricle = _empty_sdf(grid)
    center_v = center_a - ext  # only steers the veins if no ventricle fits
    for attempt in range(30):
        if attempt >= 10:  # crowded: try a smaller ventricle
            semi_v = semi_v * 0.95
        direction = _unit(rng.standard_normal(3) * ext / ext.max())  # favour the long axes
        distance = semi_a.mean() + semi_v.mean() + wall_mm + s * rng.uniform(2.0, 8.0)
        cand_center = center_a + direction * distance
        cand_center = np.clip(cand_center, 0.1 * ext, 0.9 * ext)
        cand = _blob_sdf(rng, grid, cand_center, semi_v, rng.uniform(0.1, 0.2))
        if _apart(sdf_atrium, cand, wall_mm + 1.5 * s):
            sdf_ventricle, center_v = cand, cand_center
            break
    away = _unit(center_a - center_v)

    n_veins = int(rng.integers(2, 5))
    for _ in range(n_veins):
        for _try in range(20):
            u = _random_unit(rng)
            if u @ away > -0.1:
                break
        start = center_a + u * semi_a.min() * 0.5
        length = semi_a.max() + s * rng.uniform(6.0, 14.0)
        pts = _random_walk_tube(rng, start, u, length, 2.5 * s, 0.15)
        r0 = s * rng.uniform(1.8, 2.8)
        radii = np.linspace(r0, r0 * rng.uniform(0.55, 0.8), len(pts))
        sdf_vein = _empty_sdf(grid)
        _paint_polyline(sdf_vein, grid, pts, radii)
        if _apart(sdf_vein, sdf_ventricle, wall_mm + 1.0 * s):
            np.minimum(sdf_atrium, sdf_vein, out=sdf_atrium)

    # --- aorta-like distractor: thick, uniform tube crossing the volume, thin dark wall
    aorta_r = s * rng.uniform(4.0, 6.0)
    sdf_aorta = None
    for _ in range(30):
        cand = _crossing_tube_sdf(rng, grid, aorta_r, margin=aorta_r + 0.1 * ext.min())
        if _apart(cand, sdf_atrium, 3.5 * s) and _apart(cand, sdf_ventricle, wall_mm + 2.0 * s):
            sdf_aorta = cand
            break

    # --- intensities: one acquisition protocol per case
    protocols = protocols or _ATRIUM_PROTOCOLS
    protocol = protocols[int(rng.integers(len(protocols)))]
    tissue = rng.uniform(120.0, 260.0)
    blood = tissue * rng.uniform(*protocol["blood"])
    wall = tissue * rng.uniform(*protocol["wall"])
    image = tissue * (1 + 0.12 * _smooth_noise(rng, shape, 6.0))
    # dark lung-like regions and fat-like patches
    lungs = np.clip((_smooth_noise(rng, shape, 14.0) - rng.uniform(0.6, 1.2)) * 3, 0, 1)
    _compose(image, lungs, tissue * 0.25)
    fat = np.clip((_smooth_noise(rng, shape, 5.0) - rng.uniform(2.0, 2.6)) * 3, 0, 1)
    _compose(image, fat, tissue * rng.uniform(*protocol["fat"]))

    def blood_pool() -> np.ndarray:  # flow-related inhomogeneity inside a blood pool
        return blood * (1 + protocol["inhomogeneity"] * _smooth_noise(rng, shape, 4.0))

    if sdf_aorta is not None:  # vessel wall around a uniform lumen
        _compose(image, _occupancy(sdf_aorta - s * rng.uniform(2.5, 3.5), grid), wall)
        _compose(image, _occupancy(sdf_aorta, grid), blood_pool() * rng.uniform(0.9, 1.2))
    _compose(image, _occupancy(sdf_ventricle - wall_mm, grid), wall)
    trabeculae = np.clip((_smooth_noise(rng, shape, 2.5) - 0.2) * 1.5, 0, 1)
    ventricle_blood = blood_pool() * rng.uniform(1.0, 1.3) * (1 - rng.uniform(0.5, 0.75) * trabeculae)
    _compose(image, _occupancy(sdf_ventricle, grid), ventricle_blood)
    _compose(image, _occupancy(sdf_atrium, grid), blood_pool())

    # acquisition: bias field, blur, Rician noise
    image *= np.exp(rng.uniform(*protocol["bias"]) * _smooth_noise(rng, shape, 24.0))
    image = _blur(image, grid, rng.uniform(*protocol["blur_mm"]))
    sigma = blood * rng.uniform(*protocol["noise"])
    image = np.sqrt((image + sigma * rng.standard_normal(shape, dtype=np.float32)) ** 2
                    + (sigma * rng.standard_normal(shape, dtype=np.float32)) ** 2)
    return image.astype(np.float32), (sdf_atrium <= 0).astype(np.uint8), protocol["name"]


#: The atrium task's acquisition protocols; each case draws one. They differ in what nnU-Net's intensity
#: augmentation does not undo: which tissues are bright (walls dark or enhanced above the blood, fat bright or
#: suppressed), blood-to-tissue contrast, flow inhomogeneity, bias field, blur and noise. Ranges are multiples of the
#: case's tissue intensity (``blood``, ``wall``, ``fat``), of its blood intensity (``noise``), in mm (``blur_mm``).
#: A handful of labeled cases covers only some protocols, meant to make the task label-bound (not yet reached, see
#: the README's calibration).
_ATRIUM_PROTOCOLS = (
    dict(name="bright-blood", blood=(2.2, 3.0), wall=(0.35, 0.55), fat=(1.4, 1.8), noise=(0.03, 0.05),
         blur_mm=(0.4, 0.7), bias=(0.1, 0.25), inhomogeneity=0.04),
    dict(name="grey-blood", blood=(1.6, 1.9), wall=(0.25, 0.4), fat=(2.3, 2.8), noise=(0.03, 0.05),
         blur_mm=(0.4, 0.6), bias=(0.1, 0.25), inhomogeneity=0.04),
    dict(name="enhanced-wall", blood=(1.8, 2.2), wall=(2.8, 3.4), fat=(1.0, 1.2), noise=(0.03, 0.05),
         blur_mm=(0.4, 0.7), bias=(0.1, 0.25), inhomogeneity=0.04),
    dict(name="fat-suppressed", blood=(2.0, 2.6), wall=(0.35, 0.55), fat=(0.3, 0.5), noise=(0.03, 0.06),
         blur_mm=(0.4, 0.7), bias=(0.4, 0.6), inhomogeneity=0.1),
    dict(name="dark-tissue", blood=(3.5, 4.5), wall=(0.3, 0.5), fat=(2.0, 3.0), noise=(0.02, 0.04),
         blur_mm=(0.8, 1.1), bias=(0.1, 0.25), inhomogeneity=0.04),
    dict(name="enhanced-fat-and-wall", blood=(1.7, 2.0), wall=(2.4, 2.8), fat=(2.6, 3.2), noise=(0.03, 0.05),
         blur_mm=(0.4, 0.7), bias=(0.1, 0.25), inhomogeneity=0.04),
    dict(name="flow-artefacts", blood=(2.2, 2.8), wall=(0.4, 0.6), fat=(1.3, 1.6), noise=(0.03, 0.05),
         blur_mm=(0.4, 0.7), bias=(0.2, 0.35), inhomogeneity=0.15),
    dict(name="noisy-blurred", blood=(2.4, 3.0), wall=(0.3, 0.5), fat=(1.5, 2.0), noise=(0.08, 0.11),
         blur_mm=(0.9, 1.2), bias=(0.1, 0.25), inhomogeneity=0.04),
)


def _grow_tree(rng: np.random.Generator, grid: _Grid, sdf: np.ndarray, avoid: np.ndarray, gap: float) -> None:
    """Union a branching tree of tapering, gently curving tubes into ``sdf``; the root enters
    through a random face of the volume. A branch stops before it comes within ``gap`` of ``avoid``
    (a signed distance of the structures the tree must not touch)."""
    s = grid.scale
    ext = grid.extent
    center = ext / 2
    axis = int(rng.integers(3))
    side = int(rng.integers(2))
    for _ in range(20):
        start = rng.uniform(0.2, 0.8, 3) * ext
        start[axis] = 0.0 if side == 0 else ext[axis]
        if _lookup(avoid, grid, start) > 4 * s + gap:
            break
    else:
        return
    direction = np.zeros(3)
    direction[axis] = 1.0 if side == 0 else -1.0
    direction = _unit(direction + 0.3 * rng.standard_normal(3))

    stack = [(start, direction, s * rng.uniform(2.4, 3.3), 0)]
    step = 2.0 * s
    n_segments = 0
    while stack and n_segments < 800:
        pos, d, r, depth = stack.pop()
        length = s * rng.uniform(10.0, 18.0) * (0.85 ** depth)
        r_end = r * rng.uniform(0.85, 0.95)
        n = max(2, int(np.ceil(length / step)))
        pts = [pos]
        for _ in range(n):
            # steer back when close to the border so branches stay in view
            near_border = np.any(pts[-1] < 0.15 * ext) or np.any(pts[-1] > 0.85 * ext)
            pull = 0.15 * _unit(center - pts[-1]) if near_border and depth > 0 else 0.0
            d = _unit(d + 0.12 * rng.standard_normal(3) + pull)
            nxt = pts[-1] + step * d
            if _lookup(avoid, grid, nxt) < r + gap:
                break
            pts.append(nxt)
        if len(pts) < 2:
            continue
        blocked = len(pts) < n + 1
        pts = np.asarray(pts)
        _paint_polyline(sdf, grid, pts, np.linspace(r, r_end, len(pts)))
        n_segments += len(pts) - 1
        end = pts[-1]
        if blocked or np.any(end < -2.0) or np.any(end > ext + 2.0) or depth >= 6:
            continue
        # children leave on opposite sides of the parent's direction
        perp = _unit(np.cross(d, _random_unit(rng)))
        n_children = 2 if rng.random() < 0.85 else 3
        for k in range(n_children):
            r_child = r_end * rng.uniform(0.7, 0.9)
            if r_child < 0.75 * grid.edge:
                continue
            side_dir = perp if k == 0 else (-perp if k == 1 else _unit(np.cross(d, perp)))
            angle = np.deg2rad(rng.uniform(25.0, 55.0))
            child_d = _unit(np.cos(angle) * d + np.sin(angle) * side_dir)
            stack.append((end, child_d, r_child, depth + 1))


def _torus_sdf(rng: np.random.Generator, grid: _Grid, center, major: float, minor: float) -> np.ndarray:
    rot = _random_rotation(rng)
    dz, dy, dx = grid.z - np.float32(center[0]), grid.y - np.float32(center[1]), grid.x - np.float32(center[2])
    local = [dz * np.float32(rot[k, 0]) + dy * np.float32(rot[k, 1]) + dx * np.float32(rot[k, 2]) for k in range(3)]
    ring = np.sqrt(local[1] ** 2 + local[2] ** 2) - np.float32(major)
    return np.sqrt(ring ** 2 + local[0] ** 2) - np.float32(minor)


def _sheet_sdf(rng: np.random.Generator, grid: _Grid, thickness: float, cap_radius: float) -> np.ndarray:
    """A curved plate: a patch of a large spherical shell."""
    anchor = rng.uniform(0.15, 0.85, 3) * grid.extent
    normal = _random_unit(rng)
    curvature_radius = grid.scale * rng.uniform(25.0, 60.0)
    sphere_c = anchor + normal * curvature_radius
    dz, dy, dx = grid.z - np.float32(sphere_c[0]), grid.y - np.float32(sphere_c[1]), grid.x - np.float32(sphere_c[2])
    shell = np.abs(np.sqrt(dz ** 2 + dy ** 2 + dx ** 2) - np.float32(curvature_radius)) - np.float32(thickness / 2)
    az, ay, ax = grid.z - np.float32(anchor[0]), grid.y - np.float32(anchor[1]), grid.x - np.float32(anchor[2])
    cap = np.sqrt(az ** 2 + ay ** 2 + ax ** 2) - np.float32(cap_radius)
    return np.maximum(shell, cap)


def _vessel_case(rng: np.random.Generator, grid: _Grid,
                 protocols: Sequence[dict] = None) -> Tuple[np.ndarray, np.ndarray, str]:
    s = grid.scale
    shape = grid.shape
    n_vox = float(np.prod(shape))
    gap = 2.0 * s

    # distractors first (so they are always there), then the trees grow around them
    distractors = []  # (sdf, kind)
    avoid = _empty_sdf(grid)

    def place(make, kind, tries=20):
        for _ in range(tries):
            cand = make()
            if _apart(cand, avoid, gap):
                distractors.append((cand, kind))
                np.minimum(avoid, cand, out=avoid)
                return

    n_thick = 1 + int(rng.random() < 0.4)
    for _ in range(n_thick):  # thick constant-calibre tube crossing the volume
        radius = s * rng.uniform(4.0, 5.5)
        place(lambda: _crossing_tube_sdf(rng, grid, radius, margin=radius + 0.1 * grid.extent.min()), "thick")
    # bone-like curved plate
    place(lambda: _sheet_sdf(rng, grid, s * rng.uniform(1.8, 3.0), s * rng.uniform(14.0, 24.0)), "plate")
    for _ in range(int(rng.integers(1, 3))):  # straight, unbranched, constant thin tubes (nerve/duct-like)
        radius = s * rng.uniform(1.2, 2.0)
        place(lambda: _crossing_tube_sdf(rng, grid, radius, margin=radius + 0.1 * grid.extent.min()), "thin")
    if rng.random() < 0.6:  # closed ring of vessel-like calibre
        place(lambda: _torus_sdf(rng, grid, rng.uniform(0.2, 0.8, 3) * grid.extent, s * rng.uniform(5.0, 9.0),
                                 s * rng.uniform(1.5, 2.5)), "ring")

    sdf_tree = _empty_sdf(grid)
    target = rng.uniform(0.02, 0.04)
    for _ in range(8):  # several trees, until the vessels fill their share of the volume
        _grow_tree(rng, grid, sdf_tree, avoid, gap)
        if np.count_nonzero(sdf_tree <= 0) / n_vox >= target:
            break

    # intensities: one acquisition protocol per case
    protocols = protocols or _VESSEL_PROTOCOLS
    protocol = protocols[int(rng.integers(len(protocols)))]
    tissue = rng.uniform(*protocol["tissue"])
    vessel = rng.uniform(*protocol["vessel"])
    image = tissue + protocol["texture"] * _smooth_noise(rng, shape, 5.0)
    fat = np.clip((_smooth_noise(rng, shape, 10.0) - rng.uniform(0.5, 1.2)) * 2, 0, 1)
    _compose(image, fat, rng.uniform(*protocol["fat"]))
    for sdf, kind in distractors:
        _compose(image, _occupancy(sdf, grid), vessel * rng.uniform(*protocol[kind]))
    _compose(image, _occupancy(sdf_tree, grid), vessel * (1 + 0.05 * _smooth_noise(rng, shape, 4.0)))

    # acquisition: smooth shading and drift, blur, noise
    image *= 1 + rng.uniform(*protocol["shading"]) * _smooth_noise(rng, shape, 24.0)
    image += rng.uniform(*protocol["drift"]) * _smooth_noise(rng, shape, 24.0)
    image = _blur(image, grid, rng.uniform(*protocol["blur_mm"]))
    image += rng.uniform(*protocol["noise"]) * rng.standard_normal(shape, dtype=np.float32)
    return image.astype(np.float32), (sdf_tree <= 0).astype(np.uint8), protocol["name"]


#: The vessel task's acquisition protocols; each case draws one. ``tissue``, ``vessel`` (the vessels' intensity),
#: ``fat``, ``texture``, ``drift`` and ``noise`` (standard deviation) are absolute values, Hounsfield-like for the CT
#: protocols; the look-alikes (``thick`` tube, bone-like ``plate``, ``thin`` straight tubes, ``ring``) are multiples
#: of the vessel intensity, so they are as bright as the vessels in one protocol and far brighter or darker in another
#: (enhanced veins in the venous phase, dark bone and dimmer veins in MR angiography). Like the atrium task's
#: protocols, these differ in what nnU-Net's intensity augmentation does not undo, which makes the task label-bound.
_VESSEL_PROTOCOLS = (
    dict(name="arterial-CT", tissue=(30, 70), vessel=(300, 480), fat=(-120, -70), texture=12, thick=(0.85, 1.1),
         plate=(1.3, 1.8), thin=(0.8, 1.1), ring=(0.85, 1.15), shading=(0.05, 0.2), drift=(5, 30),
         blur_mm=(0.4, 0.6), noise=(10, 25)),
    dict(name="venous-CT", tissue=(40, 80), vessel=(130, 200), fat=(-120, -70), texture=12, thick=(1.3, 1.7),
         plate=(2.5, 3.5), thin=(0.9, 1.2), ring=(0.9, 1.2), shading=(0.05, 0.2), drift=(5, 30),
         blur_mm=(0.5, 0.8), noise=(15, 30)),
    dict(name="low-dose-CT", tissue=(30, 70), vessel=(250, 400), fat=(-120, -70), texture=12, thick=(0.85, 1.1),
         plate=(1.2, 1.6), thin=(0.8, 1.1), ring=(0.85, 1.15), shading=(0.05, 0.2), drift=(5, 30),
         blur_mm=(0.6, 0.9), noise=(50, 80)),
    dict(name="beam-hardening-CT", tissue=(30, 70), vessel=(250, 420), fat=(-120, -70), texture=12,
         thick=(0.85, 1.1), plate=(1.6, 2.4), thin=(0.8, 1.1), ring=(0.85, 1.15), shading=(0.3, 0.45),
         drift=(30, 60), blur_mm=(0.4, 0.7), noise=(15, 30)),
    dict(name="MR-angiography", tissue=(150, 250), vessel=(650, 950), fat=(300, 420), texture=25, thick=(0.7, 0.9),
         plate=(0.05, 0.15), thin=(0.8, 1.0), ring=(0.85, 1.1), shading=(0.1, 0.3), drift=(5, 20),
         blur_mm=(0.4, 0.7), noise=(15, 35)),
)


class _Task:
    def __init__(self, name: str, modality: str, structure: str, code: int,
                 make: Callable[..., Tuple[np.ndarray, np.ndarray, str]], protocols: Sequence[dict],
                 description: str):
        self.name, self.modality, self.structure, self.code = name, modality, structure, code
        self.make, self.protocols, self.description = make, protocols, description

    def protocol_table(self, names: Sequence[str] = None) -> Sequence[dict]:
        """The acquisition protocols named (all of them for ``None``), in the task's order."""
        if not names:
            return self.protocols
        known = [p["name"] for p in self.protocols]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown {self.name.lower()} protocol(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(known)}")
        return [p for p in self.protocols if p["name"] in names]


TASKS: Dict[str, _Task] = {
    "atrium": _Task("Atrium", "MRI", "left_atrium", 11, _atrium_case, _ATRIUM_PROTOCOLS,
                    "Synthetic bright-blood MRI toy: label = irregular atrium blob with pulmonary-vein stubs; "
                    "unlabeled look-alikes = trabeculated ventricle blob with a dark wall and an aorta-like tube."),
    "vessel": _Task("Vessel", "CT", "vessel", 12, _vessel_case, _VESSEL_PROTOCOLS,
                    "Synthetic contrast CT toy: label = branching tapering vessel tree; unlabeled look-alikes = "
                    "thick constant-calibre tube, thin straight unbranched tubes, curved bone-like plate, "
                    "sometimes a ring."),
}


def dataset_name(dataset_id: int, task: str) -> str:
    """``Dataset501_CAMLSyntheticAtrium`` for ``(501, "atrium")``."""
    return f"Dataset{int(dataset_id):03d}_CAMLSynthetic{_task(task).name}"


def _task(task: str) -> _Task:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    return TASKS[task]


def make_case(task: str, group: str, index: int, seed: int = 0, shape=(48, 64, 64),
              spacing=(1.0, 1.0, 1.0), protocols: Sequence[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Image (float32) and label (uint8 0/1) of case ``index`` of ``group`` ("labeled", "unlabeled",
    "test"). Deterministic in (task, group, index, seed, shape, spacing, protocols); ``protocols`` (names) restricts
    the acquisition protocols the case draws from (default: all of the task's)."""
    image, label, _ = _make_case(task, group, index, seed, shape, spacing, protocols)
    return image, label


def _make_case(task: str, group: str, index: int, seed: int, shape, spacing,
               protocols: Sequence[str] = None) -> Tuple[np.ndarray, np.ndarray, str]:
    """:func:`make_case` plus the name of the case's acquisition protocol."""
    spec = _task(task)
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; choose one of {sorted(GROUPS)}")
    if len(shape) != 3 or len(spacing) != 3:
        raise ValueError("shape and spacing must have three entries (z, y, x)")
    rng = np.random.default_rng([int(seed), spec.code, GROUPS[group][1], int(index)])
    return spec.make(rng, _Grid(shape, spacing), spec.protocol_table(protocols))


def _write(array: np.ndarray, path: str, spacing: Sequence[float]) -> None:
    itk = sitk.GetImageFromArray(array)
    itk.SetSpacing([float(v) for v in spacing[::-1]])  # SimpleITK wants x, y, z
    sitk.WriteImage(itk, path, useCompression=True)


def generate_dataset(raw_root: str, dataset_id: int, task: str = "atrium", num_labeled: int = 4,
                     num_unlabeled: int = 16, num_test: int = 6, shape=(48, 64, 64), spacing=(1.0, 1.0, 1.0),
                     seed: int = 0, overwrite: bool = False, protocols: Sequence[str] = None) -> str:
    """Write a synthetic semi-supervised dataset into ``raw_root`` and return its folder.

    Layout (``XXX`` = ``dataset_id`` with three digits)::

        DatasetXXX_CAMLSynthetic<Task>/
            dataset.json            numTraining = num_labeled
            imagesTr/lab_000_0000.nii.gz    labelsTr/lab_000.nii.gz
            imagesTrUnlabeled/unl_000_0000.nii.gz   (no labels anywhere)
            imagesTs/ts_000_0000.nii.gz     labelsTs/ts_000.nii.gz

    ``shape`` and ``spacing`` are in numpy (z, y, x) order; ``protocols`` (names) restricts the acquisition
    protocols the cases draw from (default: all of the task's). An existing folder with the same id
    raises ``FileExistsError`` unless ``overwrite``; ``overwrite`` replaces only folders this module
    made (``DatasetXXX_CAMLSynthetic*``), never another dataset that happens to share the id.
    """
    spec = _task(task)
    spec.protocol_table(protocols)  # unknown protocol names fail before anything is written
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset_id must be in 1..999, got {dataset_id}")
    for name, n in (("num_labeled", num_labeled), ("num_unlabeled", num_unlabeled), ("num_test", num_test)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    if num_labeled < 1:
        raise ValueError("num_labeled must be >= 1 (nnU-Net needs labeled training cases)")

    raw_root = os.path.abspath(raw_root)
    name = dataset_name(dataset_id, task)
    out = os.path.join(raw_root, name)
    pattern = re.compile(rf"^Dataset{int(dataset_id):03d}_")
    existing = sorted(d for d in os.listdir(raw_root) if pattern.match(d)) if os.path.isdir(raw_root) else []
    if existing:
        foreign = [d for d in existing if not d.startswith(f"Dataset{int(dataset_id):03d}_CAMLSynthetic")]
        if not overwrite:
            raise FileExistsError(f"{os.path.join(raw_root, existing[0])} already exists (dataset id "
                                  f"{int(dataset_id)}); pass --overwrite (overwrite=True) to replace it")
        if foreign:
            raise FileExistsError(f"{os.path.join(raw_root, foreign[0])} uses dataset id {int(dataset_id)} and was "
                                  f"not made by this generator; --overwrite only replaces CAMLSynthetic "
                                  f"datasets, pick another id")

    os.makedirs(raw_root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=raw_root)
    case_protocols = {}
    try:
        for group, count in (("labeled", num_labeled), ("unlabeled", num_unlabeled), ("test", num_test)):
            images_dir = os.path.join(tmp, GROUPS[group][0])
            labels_dir = {"labeled": "labelsTr", "test": "labelsTs"}.get(group)
            os.makedirs(images_dir)
            if labels_dir:
                os.makedirs(os.path.join(tmp, labels_dir))
            for i in range(count):
                case = f"{_CASE_PREFIX[group]}_{i:03d}"
                image, label, case_protocols[case] = _make_case(task, group, i, seed, shape, spacing, protocols)
                _write(image, os.path.join(images_dir, f"{case}_0000.nii.gz"), spacing)
                if labels_dir:
                    _write(label, os.path.join(tmp, labels_dir, f"{case}.nii.gz"), spacing)

        from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
        generate_dataset_json(
            tmp, channel_names={0: spec.modality}, labels={"background": 0, spec.structure: 1},
            num_training_cases=num_labeled, file_ending=".nii.gz", dataset_name=name,
            description=spec.description, license="CC0 (synthetic)", converted_by="nnunetv2_caml.demo.synthetic",
            numUnlabeled=num_unlabeled, numTest=num_test, unlabeled_images_folder="imagesTrUnlabeled",
            synthetic={"task": task, "seed": int(seed), "shape": [int(v) for v in shape],
                       "spacing": [float(v) for v in spacing], "protocols": case_protocols},
        )
        for d in existing:
            shutil.rmtree(os.path.join(raw_root, d))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
