"""The torch-free ground floor of spkd: what the API, the workers and the engine all speak.

The job spec (`common.spec`), the errors a person can act on (`common.errors`), the Reporter
protocol the engine reports through (`common.reporter`), the dataset scanner (`common.scan`), the
one image decoder (`common.decode`) and the file helpers both sides write with (`common.files`:
atomic writes, sha256, a full disk). Nothing here imports torch or another package of ours
(docs/architecture.md#2-dependency-rules), so app/ and core/ stand on this floor, not on models/.
"""
