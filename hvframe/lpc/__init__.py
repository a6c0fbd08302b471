"""The LPC bridge (a PIIX3-style PCI-to-ISA bridge at `-s 31,lpc`) and the legacy PC devices
firmware needs: RTC/CMOS (rtc.py), the i8042 and its reset line (i8042.py), QEMU's fw_cfg
interface (fw_cfg.py, created with the LPC bridge) and the boot ROM (bootrom.py).

RTC and i8042 are platform devices (every machine has them); fw_cfg exists whenever the
LPC bridge or a boot ROM does (there is no separate `-l fwcfg`). To boot SeaBIOS (Debian's `seabios`):

    hvframe run -m 128M -s 0,hostbridge -s 31,lpc -l com1,stdio \
        -l bootrom,/usr/share/seabios/bios.bin

SeaBIOS's console goes to COM1 because fw_cfg's `etc/sercon-port` names it whenever COM1 is
configured. `-s 31,lpc,reboot-timeout=MS` sets fw_cfg `etc/boot-fail-wait`, how long SeaBIOS
waits after "No bootable device" before resetting the machine (exit status 0).
"""
