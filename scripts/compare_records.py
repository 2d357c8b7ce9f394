"""Compare the records of an eval run with a published examples.csv, row by row (timings excluded).

Usage: python scripts/compare_records.py NEW/examples.csv PUBLISHED/examples.csv

Each record of the new run (method, budget, task, context length, example) must match the published
one in its example digest, score, KV fraction, kept tokens, answer length, context digest and answer
text. Used to show that a change of code leaves published results as they were.
"""
import csv, sys
FIELDS = ["example_sha1", "score", "kv_fraction", "kept_tokens_mean", "new_tokens", "context_sha1", "output"]
def rows(path):
    with open(path, newline="") as f:
        return {(r["method"], r["budget"], r["task"], r["context_length"], r["example"]): r for r in csv.DictReader(f)}
new, published = rows(sys.argv[1]), rows(sys.argv[2])
same = differ = missing = 0
for key, r in sorted(new.items()):
    p = published.get(key)
    if p is None:
        missing += 1; print("not published:", key); continue
    bad = [f for f in FIELDS if f in r and f in p and p[f] != "" and r[f] != p[f]]
    if bad:
        differ += 1; print("DIFFERS", key, {f: (r[f][:60], p[f][:60]) for f in bad})
    else:
        same += 1
print(f"{same} identical, {differ} differ, {missing} not in the published file (of {len(new)} new records)")
