"""Ray Tune sweeps over the downstream evaluation: the sweep (:mod:`.sweep`), Ray's start and
stop on one machine or a cluster (:mod:`.ray_cluster`), the result tables (:mod:`.results`)."""
