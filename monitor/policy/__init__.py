"""Trigger policy: rules over a version's signals -> alarms and retrain decisions, with reasons.

A rule compares one signal with a fixed threshold, or (accuracy signals only) with the reference
accuracy minus a drop. Label-time signals (``accuracy``, ``accuracy_last_seconds``) are judged on
each :class:`LabelEvaluation` (labels come long after their window, often all at once); every
other signal on each closed feature window. A rule fires after ``consecutive`` breaching
observations of one model_version and clears after as many back inside (hysteresis).

A drop rule with ``confidence`` > 0 fires only when the value is *credibly* below the reference
minus the drop: both the reference's accuracy (from its labelled rows) and the window's value
(from its labels, or the estimate's interval) are samples, so the margin is
``z(confidence) * sqrt(se_reference^2 + se_value^2)`` below ``reference - drop``. A 300-row
reference has a standard error near 0.025: without it, clean traffic breaches by chance.

Retraining, one job at a time: a firing ``retrain`` rule only *asks* for a retrain of its
model_version. Once per cycle :meth:`Policy.resolve` turns every ask into at most one job whose
reason lists every rule that asked; an ask made while a job is queued or running, or while the
version's cooldown holds, is recorded as joined to that job and kept until it can run (or its
alarm clears, or the version is retired). Cooldown and deferral apply per model_version. An ask
only from label-free rules waits until ``retrain.min_labelled_rows`` labelled rows predicted after
the breach's onset exist: training on the shifted regime needs its labels.

Default rules (used when ``policy.rules`` is absent): drift alerts, accuracy retrains.

==========================  =========================================================  =======
name                        condition                                                  action
==========================  =========================================================  =======
online_mmd_alarm            online_mmd_alarm above 0.5 (the detector alarmed)          alert
mmd_p_value                 mmd_p_value below 0.05 for 3 windows                       alert
accuracy_drop               accuracy credibly < reference - 0.05, >= 200 labels, 2x    retrain
estimated_accuracy_drop     estimated_accuracy credibly < reference - 0.05, 3 windows  retrain
==========================  =========================================================  =======
"""
