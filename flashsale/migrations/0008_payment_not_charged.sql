-- 0008: a payment the provider never made.
--
-- A charge whose answer never came is recorded UNKNOWN, and the reconciler asks the provider
-- by idempotency key. When the provider has no charge under that key, the payment is
-- recorded NOT_CHARGED: asked and answered, nothing to refund. (A capture that still lands
-- later is in the provider's list of charges, which the reconciler reads too.)
ALTER TABLE payments DROP CONSTRAINT IF EXISTS payments_state_check,
    ADD CONSTRAINT payments_state_check
    CHECK (state IN ('PENDING', 'CAPTURED', 'DECLINED', 'REFUNDED', 'UNKNOWN', 'NOT_CHARGED'));
