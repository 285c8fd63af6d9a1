"""The engine loop: requests in (input processing), one scheduled step at a time, outputs out
(output processing, detokenizing), start-up and recovery after a failed step."""
