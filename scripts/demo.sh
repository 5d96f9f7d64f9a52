#!/usr/bin/env bash
# `make demo`: the whole product on the embedded default (CPU, onnxruntime), on synthetic phantoms.
#   phantoms -> teacher -> baseline student -> distilled student -> Dice table
# The phantoms draw tumours of 20-40 mm: at the demo's 128 px input (about 3 mm pixels) smaller
# lesions are a pixel or two wide and a few minutes of CPU training cannot learn them.
#   -> export (fp32/fp16/int8 ONNX + TensorRT-RTX engines) -> segment a held-out phantom -> latency table
#   -> the held-out phantom as a DICOM CT series -> DICOM SEG, statistics JSON, preview against the ground truth
set -euo pipefail
OUT=${1:-work/demo}
DATA=$OUT/data
VAL=$OUT/val            # separate phantoms: the export's Dice gate and nothing else
HELD_OUT=$OUT/held-out  # one more, stored slice-axis-first like KiTS19, for the SDK
# The student: the light MobileNetV2 (its CPU int8 file is both small and fast; ENet's per-channel
# overhead keeps its int8 file just above 30% of fp32 and onnxruntime runs it no faster in int8).
STUDENT=${STUDENT:-mobilenetv2}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
start=$(date +%s)
step() { printf '\n=== %s (%ds)\n' "$*" $(( $(date +%s) - start )); }

step "1/7 phantoms (LiTS layout)"
[ -f "$DATA/.done" ] || {
  rm -rf "$DATA"
  regionkd-train phantoms "$DATA" --task liver --layout lits --cases 16 --seed 0 --shape 160,160,40 --min-lesion-mm 20
  touch "$DATA/.done"
}
[ -f "$VAL/.done" ] || {
  rm -rf "$VAL"
  regionkd-train phantoms "$VAL" --task liver --layout lits --cases 3 --seed 1 --shape 160,160,40 --min-lesion-mm 20
  touch "$VAL/.done"
}
[ -f "$HELD_OUT/.done" ] || {
  rm -rf "$HELD_OUT"
  regionkd-train phantoms "$HELD_OUT" --task liver --layout kits19 --cases 1 --seed 999 --shape 512,512,100 --min-lesion-mm 20
  touch "$HELD_OUT/.done"
}

step "2/7 teacher (RAUNet)"
regionkd-train teacher --data "$DATA" --out "$OUT/teacher.pt" --preset demo --cache-dir "$OUT/cache"

step "3/7 baseline student (MobileNetV2, no distillation)"
regionkd-train student --data "$DATA" --arch $STUDENT --out "$OUT/student.pt" --preset demo --cache-dir "$OUT/cache"

step "4/7 distilled student (MobileNetV2, PMD+IMD+RAD)"
regionkd-train distill --data "$DATA" --teacher "$OUT/teacher.pt" --arch $STUDENT --kd pmd,imd,rad \
  --out "$OUT/distilled.pt" --preset demo --cache-dir "$OUT/cache"

step "5/7 evaluation on the validation phantoms"
for m in teacher student distilled; do
  regionkd-train evaluate "$OUT/$m.pt" --data "$DATA" --json "$OUT/eval-$m.json" --quiet > "$OUT/eval-$m.txt"
done
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print("Dice on the validation split (per-case mean; the per-case tables are in eval-*.txt)")
print(f"{'model':<12}" + "".join(f"{k:>10}" for k in ("liver", "tumour")))
for m in ("teacher", "student", "distilled"):
    mean = json.load(open(f"{out}/eval-{m}.json"))["mean"]
    print(f"{m:<12}" + "".join(f"{mean[k]['dice']:>10.3f}" if mean[k]["dice"] is not None else f"{'-':>10}"
                                for k in ("liver", "tumour")))
PY

step "6/7 export the distilled student"
regionkd-export "$OUT/distilled.pt" --out "$OUT/liver.bundle" --precision fp32,fp16,int8 \
  --calib "$DATA" --val "$VAL" --engine auto --overwrite

step "7/7 segment a held-out phantom and benchmark it"
HELD_IMG=$(ls "$HELD_OUT"/case_*/imaging.nii.gz | head -n 1)
mkdir -p "$OUT/masks"   # one input: -o is a .nii/.nii.gz name or an existing folder
regionkd-segment "$OUT/liver.bundle" "$HELD_IMG" -o "$OUT/masks" --preview "$OUT/preview.png"
regionkd-bench "$OUT/liver.bundle" --volume "$HELD_IMG" --precisions fp32,int8 --repeat 3 \
  --torch-checkpoint "$OUT/teacher.pt" --torch-checkpoint "$OUT/distilled.pt" --json "$OUT/bench.json"

step "DICOM: the held-out phantom as a CT series -> mask + DICOM SEG + statistics + preview beside the ground truth"
python - "$HELD_IMG" "$OUT/dicom" <<'PY'
import sys
from pathlib import Path
import nibabel as nib
import numpy as np
from regionkd.sdk.dicom_write import write_ct_series
from regionkd.sdk.orientation import to_canonical
from regionkd.sdk.volume_io import read_nifti
image, out = Path(sys.argv[1]), Path(sys.argv[2])
vol = read_nifti(image)
info = write_ct_series(vol.data, vol.affine, out / "ct_series", overwrite=True, patient_id="PHANTOM-999")
truth = nib.load(str(image.with_name("segmentation.nii.gz")))     # in the series' (RAS) voxel order
c = to_canonical(np.asarray(truth.dataobj), truth.affine)
nib.save(nib.Nifti1Image(np.ascontiguousarray(c.data).astype(np.uint8), c.affine), str(out / "truth.nii.gz"))
print(f"{out / 'ct_series'}: {len(info.sop_instance_uids)} CT slices, study {info.study_instance_uid}")
PY
regionkd-segment "$OUT/liver.bundle" "$OUT/dicom/ct_series" -o "$OUT/dicom" --output-type both --statistics \
  --preview "$OUT/dicom/preview.png" --reference "$OUT/dicom/truth.nii.gz" --report "$OUT/dicom/run.json"
cat "$OUT/dicom/ct_series.statistics.json"
if command -v dciodvfy >/dev/null; then dciodvfy "$OUT/dicom/ct_series.seg.dcm"; else echo "(dciodvfy not installed: apt-get install dicom3tools)"; fi
step "done"
