"""What a job leaves behind: `export` (weights, model cards, ONNX), `report` (report.html and its
curves), `stats` (the gain's statistics) and `tracking` (TensorBoard files and MLflow runs).
"""
