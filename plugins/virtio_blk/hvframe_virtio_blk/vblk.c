/* virtio-blk READ/WRITE served natively, with the GIL released: the chain server the core's
 * virtqueue loop (hv->vq_serve, hv_vq_cycle) calls for each available chain.
 *
 * It answers IN/OUT requests the way VirtioBlk.handle_chain() and BlockBackend do (the parity
 * tests in tests/test_vblk_fast.py hold the two together). What it must not decide (another
 * request type, no header or status byte, an O_DIRECT bounce) it declines before touching
 * anything, and the chain stays available for the Python path.
 *
 * struct vblk_req_hdr and the VBLK_* numbers are generated from hvframe_virtio_blk.layout.
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>

HV_PLUGIN_API(vblk_bind)

/* The backend as the native path sees it; virtio_blk.py refreshes fd and size per call. */
struct vblk_disk {
    int fd;                        /* < 0: closed */
    int readonly, direct, write_through;
    uint32_t logical_sector;
    uint64_t size;                 /* disk bytes */
    int wb_errno;                  /* a write-through fdatasync failed (Python keeps it) */
};

static int vblk_needs_bounce(const struct vblk_disk *b, const struct iovec *iov, int cnt)
{
    if (!b->direct)
        return 0;
    for (int i = 0; i < cnt; i++)
        if ((uintptr_t)iov[i].iov_base % b->logical_sector || iov[i].iov_len % b->logical_sector)
            return 1;
    return 0;
}

/* BlockBackend._check: whether [off, off+len) is a valid request (else IOERR). */
static int vblk_range_ok(const struct vblk_disk *b, uint64_t sector, uint64_t len)
{
    if (sector > UINT64_MAX / VBLK_SECTOR)
        return 0;
    uint64_t off = sector * VBLK_SECTOR;
    if (off % b->logical_sector || len % b->logical_sector)
        return 0;
    return len <= b->size && off <= b->size - len;
}

/* One validated IN/OUT chain: the status and the used length, or -1 to leave it to Python
 * (an O_DIRECT bounce) with nothing done. */
static int64_t vblk_request(struct vblk_disk *b, struct hv_chain *ch, uint32_t type,
                            uint64_t sector, uint8_t *status)
{
    struct iovec *data;
    int cnt;
    uint64_t total = 0;

    if (type == VBLK_T_IN) {
        /* Device-writable buffers less the status byte (the last one). */
        data = ch->iov + ch->nr;
        cnt = ch->n - ch->nr;
        if (--ch->iov[ch->n - 1].iov_len == 0)
            cnt--;
    } else {
        /* Device-readable buffers after the request header. */
        size_t skip = sizeof(struct vblk_req_hdr);
        int i = 0;
        while (i < ch->nr && skip >= ch->iov[i].iov_len)
            skip -= ch->iov[i++].iov_len;
        data = ch->iov + i;
        cnt = ch->nr - i;
        if (cnt > 0 && skip) {
            data->iov_base = (uint8_t *)data->iov_base + skip;
            data->iov_len -= skip;
        }
    }
    for (int i = 0; i < cnt; i++)
        total += data[i].iov_len;
    if (total % VBLK_SECTOR)
        goto ioerr;
    if (type == VBLK_T_OUT && b->readonly)
        goto ioerr;
    if (!vblk_range_ok(b, sector, total))
        goto ioerr;
    if (vblk_needs_bounce(b, data, cnt))
        return -1;
    /* After a failed write-through fdatasync every write fails until a reset: Python
     * answers it (a later fdatasync here would succeed and forget the lost write-back). */
    if (type == VBLK_T_OUT && b->write_through && b->wb_errno)
        return -1;
    if (type == VBLK_T_IN) {
        if (total && hv->file_rw(b->fd, data, cnt, sector * VBLK_SECTOR, 0))
            goto ioerr;
        *status = VBLK_S_OK;
        return (int64_t)total + 1;
    }
    if (total && hv->file_rw(b->fd, data, cnt, sector * VBLK_SECTOR, 1))
        goto ioerr;
    if (b->write_through) {
        int err = hv->file_datasync(b->fd);
        if (err) {
            /* The kernel reports a lost write-back once: Python keeps it (sticky). */
            b->wb_errno = err;
            goto ioerr;
        }
    }
    *status = VBLK_S_OK;
    return 1;
ioerr:
    *status = VBLK_S_IOERR;
    return 1;
}

/* The chain server (hv_chain_fn): ctx is a struct vblk_disk. */
int64_t vblk_serve_chain(void *ctx, struct hv_vq *q, struct hv_chain *ch)
{
    struct vblk_disk *b = ctx;
    (void)q;
    if (b->fd < 0 || !(b->logical_sector == 512 || b->logical_sector == 1024
                       || b->logical_sector == 2048 || b->logical_sector == 4096))
        return -HV_VQ_STOP_STATE;
    /* No header or no status byte: handle_chain's own answers. */
    if (ch->rlen < sizeof(struct vblk_req_hdr) || ch->n == ch->nr)
        return -HV_VQ_STOP_DECLINED;
    struct vblk_req_hdr h;
    uint8_t *hp = (uint8_t *)&h;
    size_t got = 0;
    for (int i = 0; i < ch->nr && got < sizeof(h); i++) {
        size_t k = ch->iov[i].iov_len;
        if (k > sizeof(h) - got)
            k = sizeof(h) - got;
        memcpy(hp + got, ch->iov[i].iov_base, k);
        got += k;
    }
    if (h.type != VBLK_T_IN && h.type != VBLK_T_OUT)
        return -HV_VQ_STOP_DECLINED;
    struct iovec *last = &ch->iov[ch->n - 1];
    uint8_t *status = (uint8_t *)last->iov_base + last->iov_len - 1;
    int64_t used_len = vblk_request(b, ch, h.type, h.sector, status);
    return used_len < 0 ? -HV_VQ_STOP_UNSUPPORTED : used_len;
}
