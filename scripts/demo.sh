#!/usr/bin/env bash
# `make demo`: the whole product on the embedded default (CPU, onnxruntime), on synthetic phantoms,
# in a scanner vendor's setting (benchmarks/README.md): a strong model, a few dozen annotated scans
# and more unannotated ones.
#   phantoms (labelled, unlabelled, test) -> teacher and, beside it, the student alone
#   -> the same student distilled from the teacher on the unannotated scans -> Dice side by side
#   -> export (fp32/fp16/int8 ONNX, each also fused with its pre/post-processing, + TensorRT-RTX engines)
#   -> segment a held-out phantom -> latency
#   -> the held-out phantom as a DICOM CT series -> DICOM SEG, statistics JSON, preview against the ground truth
# Sizes: 96x96 slices (the phantoms are made at 96x96, about 4 mm pixels), the liver lesions'
# contrast doubled as in the ablation's cpu preset, and tumours of at least 30 mm (the ablation:
# 20 mm) so that models trained for a few minutes find them. The teacher is the small U-Net; the
# teacher and the student alone train side by side, one thread each, while the core the student
# leaves free writes the other phantoms. 350 steps each: 9 min 34 s on 2 cores (400 took up to 10 min 31 s). Every training resumes
# (--resume) when rerun. The distilled student uses distill's default, chosen from the ablation
# (benchmarks/README.md): class-balanced PMD (alpha 1, T 1) on the labelled and the unlabelled
# slices of every step.
set -euo pipefail
OUT=${1:-work/demo}
DATA=$OUT/data          # labelled phantoms, LiTS layout
UNLAB=$OUT/unlabelled   # CT images only, no label files at all
TEST=$OUT/test          # held-out labelled phantoms: the Dice table and the export's gate
HELD_OUT=$OUT/held-out  # one full-size case stored slice-axis-first like KiTS19, for the SDK
STUDENT=${STUDENT:-mobilenetv2}
TEACHER=${TEACHER:-unet-small}
TEACHER_STEPS=${TEACHER_STEPS:-350}
STUDENT_STEPS=${STUDENT_STEPS:-350}
COMMON=(--preset demo --cache-dir "$OUT/cache" --resume --quiet)
LESION_MM=${LESION_MM:-30}
PHANTOMS=(--task liver --shape 96,96,32 --min-lesion-mm "$LESION_MM" --lesion-contrast 2 --quiet)
mkdir -p "$OUT"
start=$(date +%s)
step() { printf '\n=== %s (%ds)\n' "$*" $(( $(date +%s) - start )); }
made() { [ -f "$1/.done" ]; }
finish() { touch "$1/.done"; }

evaluate() {  # evaluate MODEL THREADS: Dice of $OUT/MODEL.pt on the test phantoms
  OMP_NUM_THREADS=$2 regionkd-train evaluate "$OUT/$1.pt" --data "$TEST" --cases all --json "$OUT/eval-$1.json" \
    --quiet > "$OUT/eval-$1.txt"
}
more_phantoms() {  # the unlabelled scans, the test phantoms and the full-size held-out case
  made "$UNLAB" || { rm -rf "$UNLAB"; regionkd-train phantoms "$UNLAB" --images-only --cases 60 --seed 1 "${PHANTOMS[@]}"; finish "$UNLAB"; }
  made "$TEST" || { rm -rf "$TEST"; regionkd-train phantoms "$TEST" --layout lits --cases 20 --seed 2 "${PHANTOMS[@]}"; finish "$TEST"; }
  made "$HELD_OUT" || {
    rm -rf "$HELD_OUT"
    regionkd-train phantoms "$HELD_OUT" --task liver --layout kits19 --cases 1 --seed 999 --shape 512,512,100 \
      --min-lesion-mm "$LESION_MM" --lesion-contrast 2 --quiet
    finish "$HELD_OUT"
  }
}

step "1/8 phantoms: 30 labelled cases"
made "$DATA" || { rm -rf "$DATA"; regionkd-train phantoms "$DATA" --layout lits --cases 30 --seed 0 "${PHANTOMS[@]}"; finish "$DATA"; }

step "2/8 teacher ($TEACHER, $TEACHER_STEPS steps) and, beside it, the student alone ($STUDENT, $STUDENT_STEPS steps), then 60 unlabelled scans (images only), 20 test phantoms, one 512x512x100 case"
OMP_NUM_THREADS=1 regionkd-train teacher --data "$DATA" --arch "$TEACHER" --out "$OUT/teacher.pt" \
  --max-steps "$TEACHER_STEPS" "${COMMON[@]}" &
teacher_pid=$!
OMP_NUM_THREADS=1 regionkd-train student --data "$DATA" --arch "$STUDENT" --out "$OUT/student.pt" \
  --max-steps "$STUDENT_STEPS" "${COMMON[@]}"
more_phantoms      # on the core the student alone leaves free while the teacher trains
evaluate student 1
wait $teacher_pid

step "3/8 distilled student ($STUDENT): class-balanced PMD (alpha 1, T 1) from the teacher, labelled + unlabelled scans"
OMP_NUM_THREADS=2 regionkd-train distill --data "$DATA" --teacher "$OUT/teacher.pt" --arch "$STUDENT" \
  --unlabelled "$UNLAB" --kd pmd --alpha 1 --temperature 1 --pmd-balance classes \
  --out "$OUT/distilled.pt" --max-steps "$STUDENT_STEPS" "${COMMON[@]}"

step "4/8 Dice on the $(ls "$TEST"/volume-*.nii | wc -l) test phantoms"
evaluate teacher 2
evaluate distilled 2
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = {m: json.load(open(f"{out}/eval-{m}.json")) for m in ("teacher", "student", "distilled")}
print("Dice per case, mean over the test phantoms (per-case tables in eval-*.txt)")
print(f"{'model':<34}" + "".join(f"{k:>10}" for k in ("liver", "tumour")))
names = {"teacher": f"teacher ({rows['teacher']['arch']})", "student": f"{rows['student']['arch']} alone",
         "distilled": f"{rows['distilled']['arch']} distilled (+ unlabelled)"}
for m, ev in rows.items():
    print(f"{names[m]:<34}" + "".join(f"{ev['mean'][k]['dice']:>10.3f}" if ev["mean"][k]["dice"] is not None
                                      else f"{'-':>10}" for k in ("liver", "tumour")))
d = rows["distilled"]["mean"]["tumour"]["dice"] - rows["student"]["mean"]["tumour"]["dice"]
print(f"distilled - alone, tumour Dice: {d:+.3f} (one seed, {len(rows['student']['case_ids'])} cases: "
      f"benchmarks/README.md has the measured effect with seeds and intervals)")
PY

step "5/8 export the distilled student"
# the Dice gate at 0.03: on 20 small test phantoms the int8 graphs lose about 0.02 tumour Dice
OMP_NUM_THREADS=2 regionkd-export "$OUT/distilled.pt" --out "$OUT/liver.bundle" --precision fp32,fp16,int8 \
  --calib "$DATA" --val "$TEST" --engine auto --max-dice-drop 0.03 --overwrite

step "6/8 segment a held-out phantom (512x512x100) with the bundle"
HELD_IMG=$(ls "$HELD_OUT"/case_*/imaging.nii.gz | head -n 1)
mkdir -p "$OUT/masks"   # one input: -o is a .nii/.nii.gz name or an existing folder
OMP_NUM_THREADS=2 regionkd-segment "$OUT/liver.bundle" "$HELD_IMG" -o "$OUT/masks" --preview "$OUT/preview.png"

step "7/8 latency per volume: the bundle against the PyTorch teacher and student"
OMP_NUM_THREADS=2 regionkd-bench "$OUT/liver.bundle" --volume "$HELD_IMG" --precisions fp32,int8 --repeat 3 \
  --checkpoint "$OUT/teacher.pt" --checkpoint "$OUT/distilled.pt" --json "$OUT/bench.json"
step "8/8 DICOM: the held-out phantom as a CT series -> mask + DICOM SEG + statistics + preview beside the ground truth"
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
OMP_NUM_THREADS=2 regionkd-segment "$OUT/liver.bundle" "$OUT/dicom/ct_series" -o "$OUT/dicom" --output-type both --statistics \
  --preview "$OUT/dicom/preview.png" --reference "$OUT/dicom/truth.nii.gz" --report "$OUT/dicom/run.json"
cat "$OUT/dicom/ct_series.statistics.json"
if command -v dciodvfy >/dev/null; then dciodvfy "$OUT/dicom/ct_series.seg.dcm"; else echo "(dciodvfy not installed: apt-get install dicom3tools)"; fi
step "done"
