/* A device that is not hvframe's: a third party's native module, built against the core's
 * API alone (hvframe_native.h), serving a virtqueue. Each chain's readable bytes come back
 * byte-reversed in its writable buffers; the used length is what was written. A chain with
 * nothing readable is declined (the Python side answers it), so the test sees both paths.
 * struct echo_stats and ECHO_* come from the test's construct declarations. */
#include <string.h>

HV_PLUGIN_API(echo_bind)

int64_t echo_serve_chain(void *ctx, struct hv_vq *q, struct hv_chain *ch)
{
    struct echo_stats *st = ctx;
    (void)q;
    if (ch->rlen == 0 || ch->rlen > ECHO_MAX)
        return -HV_VQ_STOP_DECLINED;
    uint8_t in[ECHO_MAX];
    uint64_t got = 0;
    for (int i = 0; i < ch->nr; i++) {
        memcpy(in + got, ch->iov[i].iov_base, ch->iov[i].iov_len);
        got += ch->iov[i].iov_len;
    }
    uint64_t put = 0;
    for (int i = ch->nr; i < ch->n && put < got; i++) {
        uint8_t *out = ch->iov[i].iov_base;
        for (size_t k = 0; k < ch->iov[i].iov_len && put < got; k++, put++)
            out[k] = in[got - 1 - put];
    }
    st->chains++;
    st->bytes += put;
    return (int64_t)put;
}

/* The same through the lower-level calls a device with its own loop would use. */
int echo_drain(struct hv_vq *q, struct echo_stats *st)
{
    struct hv_chain ch;
    int n = 0;
    if (hv->vq_begin(q))
        return -1;
    while (hv->vq_peek(q, &ch) == HV_VQ_CHAIN) {
        int64_t used = echo_serve_chain(st, q, &ch);
        if (used < 0)
            break;
        hv->vq_push(q, &ch, (uint32_t)used);
        n++;
    }
    return n;
}

/* A batch server (hv_batch_fn) with the same answers: up to 8 chains peeked ahead of the
 * queue's head and served, then returned together. st->lie makes it misbehave, for the
 * core's checks: 1 claims one chain more than it was allowed, 2 sets no stop code, 3 says it
 * stopped at max having served none. */
int echo_serve_batch(void *ctx, struct hv_vq *q, int max)
{
    struct echo_stats *st = ctx;
    static __thread struct hv_chain ch;
    uint16_t heads[8];
    uint32_t lens[8];
    int served = 0;
    if (st->lie == 1) {
        q->stop = HV_VQ_STOP_EMPTY;
        return max + 1;
    }
    if (st->lie == 2) {
        q->stop = HV_VQ_CHAIN;
        return 0;
    }
    if (st->lie == 3) {
        q->stop = HV_VQ_STOP_MAX;
        return 0;
    }
    for (;;) {
        int n = 0, stop = 0;
        while (n < 8 && served + n < max) {
            int rc = hv->vq_peek_at(q, (uint32_t)n, &ch);
            if (rc != HV_VQ_CHAIN) {
                stop = rc;
                break;
            }
            int64_t used = echo_serve_chain(st, q, &ch);
            if (used < 0) {
                stop = (int)-used;
                break;
            }
            heads[n] = ch.head;
            lens[n] = (uint32_t)used;
            n++;
        }
        hv->vq_push_n(q, heads, lens, (uint32_t)n);
        served += n;
        if (stop) {
            q->stop = stop;
            return served;
        }
        if (served >= max) {
            q->stop = HV_VQ_STOP_MAX;
            return served;
        }
    }
}
