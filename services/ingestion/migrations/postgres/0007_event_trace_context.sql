-- The W3C trace context of each event (`traceparent`, `tracestate`): the span that accepted it,
-- so delivery continues the event's own trace downstream. NULL when trace export is off (or the
-- event was logged before this column existed). Written by the same statement as the event.
ALTER TABLE events ADD COLUMN trace_parent TEXT;
ALTER TABLE events ADD COLUMN trace_state TEXT;
