import gdb
gdb.execute("set pagination off")
gdb.execute("set print thread-events off")
num = None
for t in gdb.selected_inferior().threads():
    if t.name and "live_migration" in t.name:
        num = t.num
print("MIGRATION THREAD", num, flush=True)
BQL = [None]

class LockBP(gdb.Breakpoint):
    def stop(self):
        f = gdb.newest_frame()
        rdi = int(gdb.parse_and_eval("$rdi"))
        older = f.older()
        oname = older.name() if older else None
        if BQL[0] is None and oname == "qemu_mutex_lock_iothread_impl":
            BQL[0] = rdi
            print("BQL", hex(rdi), flush=True)
        if gdb.selected_thread().num == num and rdi == BQL[0]:
            print("COLO-THREAD BQL LOCK via", self.location, flush=True)
            gdb.execute("bt 10")
        return False

class UnlockBP(gdb.Breakpoint):
    def stop(self):
        rdi = int(gdb.parse_and_eval("$rdi"))
        if gdb.selected_thread().num == num and rdi == BQL[0]:
            print("COLO-THREAD BQL UNLOCK via", self.location, flush=True)
            gdb.execute("bt 4")
        return False

class CondBP(gdb.Breakpoint):
    def stop(self):
        rsi = int(gdb.parse_and_eval("$rsi"))
        if gdb.selected_thread().num == num and rsi == BQL[0]:
            print("COLO-THREAD COND WAIT ON BQL via", self.location, flush=True)
            gdb.execute("bt 12")
        return False

CondBP("qemu_cond_wait_impl")
CondBP("qemu_cond_timedwait_impl")
LockBP("qemu_mutex_lock_impl")
LockBP("qemu_mutex_trylock_impl")
UnlockBP("qemu_mutex_unlock_impl")
gdb.execute("continue")
