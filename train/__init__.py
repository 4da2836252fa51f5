"""The training program: datasets, training, evaluation, ablation and export (`python -m train`).

It imports the model, the clinical text builder and the pixel pipeline from `cadnode`, so training
and serving cannot drift. Serving never imports this package.
"""
