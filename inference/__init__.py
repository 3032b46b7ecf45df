"""Flask-free model math the predictor and serving use: micro-batching, calibration and the
"none of these" (OOD) score, saliency maps and their heatmaps, image statistics, and the
lightweight inference engine."""
