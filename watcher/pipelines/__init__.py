"""The pipelines: what is done to every revision, in resumable steps (analyze; archive: check, upload,
process, fetch), with the pieces they share: the precheck, paid calls through the gate, the archive plan,
delivery, sidecars and the done/failed-folder mover."""
