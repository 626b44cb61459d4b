"""Train ``ct_lung_unet`` and export it to ``../1/model.onnx``, reproducibly.

    .venv-train/bin/python model_repository/ct_lung_unet/train/train.py

(an environment with this repository installed and the ``train`` extra: PyTorch,
ONNX; see the README's "Bringing a trained model"). Fixed seeds, one thread
count and PyTorch's deterministic algorithms: the same environment gives the same
weights.

Training data: axial slices of the chest phantom (``infergate.testing``) with its
geometry varied per slice: body and lung sizes and places, the trachea, vessels,
noise, pixel spacing and the patient's place on the table; the truth is the
phantom's own lungs. No real chest CT with lung masks can be shipped here, so
none is used; the record says so.

Validation (written to ``VALIDATION.md`` beside this file, with the figures the
model card quotes): Dice against the truth on slices of geometries not trained on,
and on the suite's own 100-slice chest phantom against its truth and against the
heuristic model ``ct_lung_seg`` on the same volume. (What it calls lung in a real
head CT, which has none, is checked by the suite: ``tests/integration/
test_trained_model.py``.)
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention

from infergate.inference.volume import load_series
from infergate.testing.phantoms import (
    ChestGeometry,
    axial_grid,
    chest_slice,
    write_chest_ct,
)

HERE = Path(__file__).resolve().parent
MODEL = HERE.parent
REPO = MODEL.parent.parent
sys.path.insert(0, str(HERE))
from network import DOWNSAMPLE, Deployed, UNet, network_input  # noqa: E402

SEED = 20261202
SIZE = 512
OPSET = 17


def _geometry(rng: np.random.Generator) -> ChestGeometry:
    """A chest unlike the default one: each shape moved and resized within what
    keeps the lungs inside the body."""
    u = rng.uniform
    vessels = tuple(
        (float(rng.choice([-1, 1]) * u(40, 90)), u(-40, 30), u(-150, 150))
        for _ in range(int(rng.integers(0, 6)))
    )
    return ChestGeometry(
        body_axes=(u(150, 195), u(105, 135)),
        table_y=(u(128, 140), u(142, 155)),
        airway_centre_y=u(-50, -30),
        airway_radius=u(6, 11),
        airway_from=u(0.45, 0.65),
        right_lung=((-u(58, 82), u(-15, 5), u(-10, 10)), (u(40, 60), u(60, 85), u(0.65, 0.9))),
        left_lung=((u(58, 82), u(-15, 5), u(-10, 10)), (u(38, 56), u(55, 80), u(0.6, 0.85))),
        vessels=vessels,
        vessel_radius=u(3, 7),
        noise_hu=u(5, 30),
    )


def training_slices(count: int, seed: int) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.uint8]]:
    """``count`` slices (HU, truth) of varied phantoms, SIZE x SIZE."""
    rng = np.random.default_rng(seed)
    hu = np.empty((count, SIZE, SIZE), dtype=np.int16)
    truth = np.empty((count, SIZE, SIZE), dtype=np.uint8)
    for i in range(count):
        spacing = rng.uniform(0.55, 0.9)
        _, y, x = axial_grid(SIZE, spacing, np.zeros(1))
        shift_x, shift_y = rng.uniform(-20, 20, size=2)
        extent = rng.uniform(100, 200)
        z = rng.uniform(-1.1, 1.1) * extent
        hu[i], truth[i] = chest_slice(
            _geometry(rng), x[0] - shift_x, y[0] - shift_y, float(z), extent=extent, rng=rng
        )
    return hu, truth


def dice(found: npt.NDArray[Any], truth: npt.NDArray[Any], label: int) -> float:
    a, b = found == label, truth == label
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _labels(model: Deployed, hu: npt.NDArray[np.int16], batch: int = 16) -> npt.NDArray[np.uint8]:
    with torch.no_grad():
        parts = [
            model(torch.from_numpy(hu[i : i + batch])).numpy() for i in range(0, len(hu), batch)
        ]
    return np.concatenate(parts)


def train(slices: int, epochs: int, width: int) -> tuple[Deployed, list[str]]:
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    hu, truth = training_slices(slices, SEED)
    with torch.no_grad():
        inputs = torch.cat(
            [network_input(torch.from_numpy(hu[i : i + 64])) for i in range(0, slices, 64)]
        )
    offset = DOWNSAMPLE // 2
    targets = torch.from_numpy(truth[:, offset::DOWNSAMPLE, offset::DOWNSAMPLE].astype(np.int64))
    del hu, truth
    net = UNet(width)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    steps_per_epoch = slices // 32
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=3e-3, total_steps=epochs * steps_per_epoch
    )
    # The lungs are a small part of each slice: their classes weigh more.
    weights = torch.tensor([0.2, 1.0, 1.0])
    log = []
    generator = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(slices, generator=generator)
        total = 0.0
        started = time.perf_counter()
        for step in range(steps_per_epoch):
            pick = order[step * 32 : (step + 1) * 32]
            loss = F.cross_entropy(net(inputs[pick]), targets[pick], weight=weights)
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            schedule.step()
            total += loss.item()
        line = (
            f"epoch {epoch + 1}/{epochs}: loss {total / steps_per_epoch:.4f}"
            f" ({time.perf_counter() - started:.0f} s)"
        )
        print(line, flush=True)
        log.append(line)
    net.eval()
    return Deployed(net).eval(), log


def export(model: Deployed, path: Path) -> None:
    example = torch.zeros((2, SIZE, SIZE), dtype=torch.int16)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["CT_HU"],
        output_names=["LUNG_LABELS"],
        dynamic_axes={
            "CT_HU": {0: "slices", 1: "rows", 2: "columns"},
            "LUNG_LABELS": {0: "slices", 1: "rows", 2: "columns"},
        },
        opset_version=OPSET,
        dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)))


def _heuristic() -> Any:
    """``ct_lung_seg``'s algorithm, imported from its model file."""
    spec = importlib.util.spec_from_file_location(
        "ct_lung_seg_model", REPO / "model_repository" / "ct_lung_seg" / "1" / "model.py"
    )
    if spec is None or spec.loader is None:
        raise ImportError("ct_lung_seg's model.py cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def validate(model: Deployed, held_out: int) -> list[str]:
    lines = []
    hu, truth = training_slices(held_out, SEED + 1)
    found = _labels(model, hu)
    lines.append(
        f"| held-out varied phantom slices ({held_out}) | truth"
        f" | {dice(found, truth, 1):.4f} | {dice(found, truth, 2):.4f} |"
    )
    with tempfile.TemporaryDirectory() as tmp:
        phantom = write_chest_ct(Path(tmp), slices=100)
        loaded = load_series(list(phantom.paths), volume_type="int16")
        volume = np.asarray(loaded.series.volume)
        # The same phantom's truth, slice by slice in the volume's order.
        _, y, x = axial_grid(SIZE, 0.7, np.zeros(1))
        extent = 99 * 2.5 / 2.0
        z_values = [float(loaded.series.origin[2]) + 2.5 * k for k in range(len(volume))]
        rng = np.random.default_rng(0)
        truth = np.stack(
            [
                chest_slice(ChestGeometry(), x[0], y[0], z, extent=extent, rng=rng)[1]
                for z in z_values
            ]
        )
        found = _labels(model, volume)
        spacing = np.asarray(loaded.series.spacing, dtype=np.float32)
        heuristic = _heuristic().segment_lungs(volume, spacing)
    lines.append(
        f"| the suite's chest phantom (100 x 512 x 512) | truth"
        f" | {dice(found, truth, 1):.4f} | {dice(found, truth, 2):.4f} |"
    )
    lines.append(
        f"| the same | `ct_lung_seg` (heuristic) | {dice(found, heuristic, 1):.4f}"
        f" | {dice(found, heuristic, 2):.4f} |"
    )
    lines.append(
        f"| `ct_lung_seg` on the same, for reference | truth | {dice(heuristic, truth, 1):.4f}"
        f" | {dice(heuristic, truth, 2):.4f} |"
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=1536)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--output", type=Path, default=MODEL / "1" / "model.onnx")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    model, log = train(args.slices, args.epochs, args.width)
    trained_s = time.perf_counter() - started
    export(model, args.output)
    figures = validate(model, args.held_out)
    record = [
        "# ct_lung_unet: training and validation record",
        "",
        "Written by `train.py` (do not edit by hand). Dice per label (1: the lung at",
        "smaller column indices, the patient's right in a standard axial image; 2: the",
        "other).",
        "",
        "| data | against | Dice 1 | Dice 2 |",
        "|---|---|---|---|",
        *figures,
        "",
        f"- Trained on {args.slices} varied phantom slices ({SIZE} x {SIZE}), {args.epochs}"
        f" epochs, width {args.width}, seed {SEED}, in {trained_s:.0f} s on"
        f" {torch.get_num_threads()} CPU threads.",
        f"- PyTorch {torch.__version__}, ONNX {onnx.__version__} (opset {OPSET}),"
        f" Python {platform.python_version()}.",
        f"- `1/model.onnx`: {args.output.stat().st_size:,} bytes,"
        f" {sum(p.numel() for p in model.parameters()):,} parameters.",
        "- No real chest CT with lung masks is shipped here, so none was trained or validated on.",
        "",
        "Training log:",
        "",
        *(f"    {line}" for line in log),
        "",
    ]
    (HERE / "VALIDATION.md").write_text("\n".join(record), encoding="utf-8")
    print("\n".join(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
