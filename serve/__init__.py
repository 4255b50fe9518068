"""serve: the deploy model behind HTTP (app), over a folder (predict_folder) and as a Triton repository (triton)."""
