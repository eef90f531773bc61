"""FFHQ face alignment: 68 face landmarks → the oriented square FFHQ's photos were cut with.

The recipe of the FFHQ dataset's ``download_ffhq.py`` (also e4e's ``utils/alignment.py``), rewritten
in numpy/PIL: the eye centres and the mouth corners give an oriented square (its x axis along the eye
line, tilted to keep the eye-to-mouth line vertical), centred a tenth of the way from the eyes to the
mouth, with a half side of max(2 × eye distance, 1.8 × eye-to-mouth distance). A face far larger than
the output is first shrunk, the image cropped to the square plus a border, padded (reflected, blurred
towards the border and faded to the median colour) where the square leaves the picture, and the
square resampled to ``size`` × ``size``. So eyes and mouth land where they land in FFHQ, whatever the
face's tilt, size or position.

Landmarks come from a user's TorchScript network (``LandmarkModel``): an image tensor (1, 3, H, W)
float in [0, 1] → 68 (x, y) points in pixels, in the iBUG-68 order dlib's ``shape_predictor_68``
gives. Nothing here downloads a model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageFilter

N_LANDMARKS = 68
EYE_LEFT = slice(36, 42)  # iBUG-68: the eye on the image's left
EYE_RIGHT = slice(42, 48)
MOUTH_LEFT, MOUTH_RIGHT = 48, 54  # outer mouth corners


class LandmarkError(ValueError):
    """Landmarks that cannot align a face (wrong shape, not finite, degenerate); the message says why."""


@dataclass(frozen=True)
class Alignment:
    """What ``align_face`` did: the square cut from the source (corners in source pixels: top-left,
    bottom-left, bottom-right, top-right, as PIL's QUAD transform takes them), the output side, the
    points it was built from, and whether padding filled parts outside the picture."""

    quad: np.ndarray  # (4, 2)
    size: int
    eye_left: tuple[float, float]
    eye_right: tuple[float, float]
    mouth_left: tuple[float, float]
    mouth_right: tuple[float, float]
    padded: bool

    def project(self, points: Any) -> np.ndarray:
        """Source pixel coordinates (N, 2) → their pixel coordinates in the aligned image."""
        p = np.asarray(points, np.float64).reshape(-1, 2)
        origin, right, down = self.quad[0], self.quad[3] - self.quad[0], self.quad[1] - self.quad[0]
        u = (p - origin) @ right / (right @ right)
        v = (p - origin) @ down / (down @ down)
        return np.stack([u, v], axis=1) * self.size

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record (stored beside the ingested image)."""
        return {
            "quad": np.round(self.quad, 2).tolist(),
            "size": self.size,
            "eye_left": _rounded(self.eye_left),
            "eye_right": _rounded(self.eye_right),
            "mouth_left": _rounded(self.mouth_left),
            "mouth_right": _rounded(self.mouth_right),
            "padded": self.padded,
        }


def check_landmarks(points: Any) -> np.ndarray:
    """(68, 2) float64 from a network's output ((68, 2) or (1, 68, 2)); LandmarkError otherwise."""
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().double().numpy()
    try:
        arr = np.asarray(points, np.float64)
    except (TypeError, ValueError) as exc:
        raise LandmarkError(f"landmarks are not an array of numbers ({exc})") from None
    if arr.shape == (1, N_LANDMARKS, 2):
        arr = arr[0]
    if arr.shape != (N_LANDMARKS, 2):
        raise LandmarkError(
            f"expected {N_LANDMARKS} (x, y) landmarks, shape ({N_LANDMARKS}, 2), got {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise LandmarkError("the landmarks are not finite (no face found?)")
    return arr


def face_quad(landmarks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The oriented square (4, 2) of FFHQ's recipe and the eye/mouth points it was built from."""
    lm = check_landmarks(landmarks)
    eye_left, eye_right = lm[EYE_LEFT].mean(axis=0), lm[EYE_RIGHT].mean(axis=0)
    mouth_left, mouth_right = lm[MOUTH_LEFT], lm[MOUTH_RIGHT]
    eye_mid, mouth_mid = (eye_left + eye_right) / 2, (mouth_left + mouth_right) / 2
    eye_to_eye, eye_to_mouth = eye_right - eye_left, mouth_mid - eye_mid
    # x: the eye line, turned so that the eye-to-mouth line is perpendicular to it on average
    x = eye_to_eye + np.array([eye_to_mouth[1], -eye_to_mouth[0]])
    norm = np.hypot(*x)
    half = max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    if not norm > 1e-6 or not half >= 1.0:
        raise LandmarkError("degenerate landmarks: the eyes and the mouth (nearly) coincide")
    x = x / norm * half
    y = np.array([-x[1], x[0]])  # x turned 90° clockwise on screen: pointing down the face
    c = eye_mid + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    points = {"eye_left": eye_left, "eye_right": eye_right}
    return quad, points | {"mouth_left": mouth_left, "mouth_right": mouth_right}


def align_face(
    image: Image.Image, landmarks: Any, size: int, pad: bool = True
) -> tuple[Image.Image, Alignment]:
    """The FFHQ-aligned ``size`` × ``size`` RGB crop of ``image`` and what was done.

    ``pad``: fill the parts of the square outside the picture as FFHQ does (reflection, blurred and
    faded to the median colour); False: black.
    """
    quad, points = face_quad(landmarks)
    img, q = image.convert("RGB"), quad.copy()
    side = float(np.hypot(*(q[3] - q[0])))
    img, q, side = _shrink(img, q, side, size)
    border = max(int(np.rint(side * 0.1)), 3)
    img, q = _crop(img, q, border)
    padded = False
    if pad:
        img, q, padded = _pad(img, q, side, border)
    out = img.transform(
        (size, size), Image.Transform.QUAD, (q + 0.5).flatten().tolist(), Image.Resampling.BILINEAR
    )
    record = {k: (float(v[0]), float(v[1])) for k, v in points.items()}
    return out, Alignment(quad=quad, size=size, padded=padded, **record)


def _shrink(
    img: Image.Image, q: np.ndarray, side: float, size: int
) -> tuple[Image.Image, np.ndarray, float]:
    """Shrink by a whole factor first when the face is over twice the output (less aliasing)."""
    factor = int(np.floor(side / size * 0.5))
    if factor <= 1:
        return img, q, side
    new = (int(np.rint(img.width / factor)), int(np.rint(img.height / factor)))
    return img.resize(new, Image.Resampling.LANCZOS), q / factor, side / factor


def _crop(img: Image.Image, q: np.ndarray, border: int) -> tuple[Image.Image, np.ndarray]:
    """Cut the picture down to the square's bounding box plus ``border`` (inside the picture)."""
    lo, hi = np.floor(q.min(axis=0)).astype(int), np.ceil(q.max(axis=0)).astype(int)
    box = (
        max(lo[0] - border, 0),
        max(lo[1] - border, 0),
        min(hi[0] + border, img.width),
        min(hi[1] + border, img.height),
    )
    if box[2] - box[0] < img.width or box[3] - box[1] < img.height:
        return img.crop(box), q - np.array(box[:2], np.float64)
    return img, q


def _pad(
    img: Image.Image, q: np.ndarray, side: float, border: int
) -> tuple[Image.Image, np.ndarray, bool]:
    """Where the square leaves the picture: reflect the picture outwards, blur the reflection more the
    further out it lies and fade it to the picture's median colour (FFHQ's padding)."""
    lo, hi = np.floor(q.min(axis=0)).astype(int), np.ceil(q.max(axis=0)).astype(int)
    left, top = max(border - lo[0], 0), max(border - lo[1], 0)
    right, bottom = max(hi[0] - img.width + border, 0), max(hi[1] - img.height + border, 0)
    if max(left, top, right, bottom) <= border - 4:
        return img, q, False
    least = max(int(np.rint(side * 0.3)), 1)
    left, top, right, bottom = (max(v, least) for v in (left, top, right, bottom))
    arr = np.pad(np.asarray(img, np.float32), ((top, bottom), (left, right), (0, 0)), "reflect")
    h, w = arr.shape[:2]
    xs = np.arange(w, dtype=np.float32)[None, :, None]
    ys = np.arange(h, dtype=np.float32)[:, None, None]
    outside = np.maximum(
        1.0 - np.minimum(xs / left, (w - 1 - xs) / right),
        1.0 - np.minimum(ys / top, (h - 1 - ys) / bottom),
    )
    blurred = Image.fromarray(np.uint8(np.clip(np.rint(arr), 0, 255))).filter(
        ImageFilter.GaussianBlur(side * 0.02)
    )
    arr += (np.asarray(blurred, np.float32) - arr) * np.clip(outside * 3.0 + 1.0, 0.0, 1.0)
    arr += (np.median(arr, axis=(0, 1)) - arr) * np.clip(outside, 0.0, 1.0)
    out = Image.fromarray(np.uint8(np.clip(np.rint(arr), 0, 255)), "RGB")
    return out, q + np.array([left, top], np.float64), True


class LandmarkModel:
    """A user's TorchScript landmark network: (1, 3, H, W) float in [0, 1] → 68 (x, y) pixels."""

    def __init__(self, module: torch.jit.ScriptModule | torch.nn.Module):
        self.module = module.eval()

    @classmethod
    def load(cls, f: IO[bytes]) -> LandmarkModel:
        """From an open TorchScript file (``torch.jit.save``), on the CPU."""
        with warnings.catch_warnings():  # torch 2.14 calls TorchScript deprecated; it still loads
            warnings.simplefilter("ignore", FutureWarning)
            return cls(torch.jit.load(f, map_location="cpu"))

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> np.ndarray:
        """The (68, 2) landmarks of ``image``; LandmarkError when the output is not usable."""
        pixels = np.asarray(image.convert("RGB"), np.float32) / 255.0
        x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).contiguous()
        return check_landmarks(self.module(x))


def _rounded(point: tuple[float, float]) -> list[float]:
    return [round(point[0], 2), round(point[1], 2)]
