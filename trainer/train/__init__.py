"""Pretraining: the loop (:mod:`.loop`), its typed config (:mod:`.config`), verified
checkpoints (:mod:`.checkpoint`), what decides a resume (:mod:`.resume`) and telemetry."""
