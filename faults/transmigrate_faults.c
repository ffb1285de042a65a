// SPDX-License-Identifier: GPL-2.0
/*
 * transmigrate_faults: the research's kernel faults, reproduced for real, so
 * that the host-side monitor has something true to detect.
 *
 * Control file /proc/transmigrate_faults (root only). Write one command:
 *
 *   deadlock CPU      a kthread "tm_deadlock/CPU", bound to CPU, takes the
 *                     spinlock tm_fault_lock and takes it again: it spins
 *                     forever in the kernel with preemption off (interrupts
 *                     stay on, so the CPU's timer still ticks, but nothing
 *                     else ever runs there again). Cannot be undone.
 *   deadlock-irq CPU  the same with interrupts off as well (spin_lock_irq):
 *                     the CPU's timer interrupts stop too.
 *   deadlock-all      the same deadlock on a CPU other than the writer's, and
 *                     on every other one a kthread "tm_deadlock/CPU" that waits
 *                     for tm_fault_lock: every CPU spins with preemption off.
 *                     The writer's own CPU is taken too, so the write may never
 *                     return.
 *   wake              release the readers blocked on /dev/tm_hang (the fix
 *                     the buggy driver lacks), so that they can be killed.
 *   oops              BUG() in tm_oops, in the writer's context: a kernel
 *                     oops that kills the writer and leaves the kernel
 *                     running, tainted with TAINT_DIE.
 *
 * Reading it reports the state, one "key value" per line.
 *
 * /dev/tm_hang, a misc character device with the research's driver bug: read()
 * sleeps uninterruptibly (TASK_UNINTERRUPTIBLE, in tm_hang_read) until data
 * "arrives", but write(), which accepts and stores the data, never wakes the
 * readers. Readers pile up in state D, all in tm_hang_read; SIGKILL does not
 * free them; only "wake" on the control file does.
 *
 * Commands are asynchronous: the write returns at once and the fault unfolds.
 */

#include <linux/atomic.h>
#include <linux/cpumask.h>
#include <linux/err.h>
#include <linux/fs.h>
#include <linux/kernel.h>
#include <linux/jiffies.h>
#include <linux/kthread.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/proc_fs.h>
#include <linux/sched.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <linux/wait.h>

#define TM_HANG_BUFSIZE 4096
#define TM_CONTROL "transmigrate_faults"

/* ---- (a) spinlock deadlock ---------------------------------------------- */

/* The lock that is never released; global so a monitor can find it by name. */
DEFINE_SPINLOCK(tm_fault_lock);
EXPORT_SYMBOL_GPL(tm_fault_lock);

static int tm_deadlock_cpu = -1;       /* CPU wedged, -1 while none */
static int tm_deadlock_irqs_off;
static int tm_deadlock_all;            /* every CPU wedged */
static atomic_t tm_deadlock_spinning = ATOMIC_INIT(0);
static DEFINE_MUTEX(tm_control_mutex);

static noinline int tm_deadlock_thread(void *data)
{
	bool irqs_off = data != NULL;

	if (irqs_off)
		spin_lock_irq(&tm_fault_lock);
	else
		spin_lock(&tm_fault_lock);
	pr_emerg("transmigrate_faults: tm_fault_lock held on CPU %d, taking it again (irqs %s)\n",
		 raw_smp_processor_id(), irqs_off ? "off" : "on");
	atomic_set(&tm_deadlock_spinning, 1);
	/* The bug: the same lock again, on the same CPU. This never returns. */
	spin_lock(&tm_fault_lock);
	/* Unreachable; keeps the compiler from seeing a lock leak it could warn about. */
	spin_unlock(&tm_fault_lock);
	if (irqs_off)
		spin_unlock_irq(&tm_fault_lock);
	else
		spin_unlock(&tm_fault_lock);
	return 0;
}

/* On every CPU but the holder's: wait for the lock that is never released. */
static noinline int tm_deadlock_waiter(void *data)
{
	spin_lock(&tm_fault_lock);
	spin_unlock(&tm_fault_lock);  /* unreachable */
	return 0;
}

static int tm_start_deadlock(unsigned int cpu, bool irqs_off);

/*
 * The waiters are created first (creating a kthread sleeps), then the holder
 * takes the lock on another CPU than the writer's, then every waiter is woken
 * at once: the last runs on the writer's CPU, which never gets it back.
 */
static int tm_start_deadlock_all(void)
{
	struct task_struct **waiters;
	unsigned int cpu, holder;
	unsigned long until;
	int err = 0;

	if (tm_deadlock_cpu >= 0)
		return -EBUSY;
	waiters = kcalloc(nr_cpu_ids, sizeof(*waiters), GFP_KERNEL);
	if (!waiters)
		return -ENOMEM;
	holder = cpumask_any_but(cpu_online_mask, raw_smp_processor_id());
	if (holder >= nr_cpu_ids)
		holder = raw_smp_processor_id();  /* one CPU: the writer's own */
	for_each_online_cpu(cpu) {
		struct task_struct *task;

		if (cpu == holder)
			continue;
		task = kthread_create(tm_deadlock_waiter, NULL, "tm_deadlock/%u", cpu);
		if (IS_ERR(task)) {
			err = PTR_ERR(task);
			goto out;
		}
		kthread_bind(task, cpu);
		waiters[cpu] = task;
	}
	err = tm_start_deadlock(holder, false);
	if (err)
		goto out;
	tm_deadlock_all = 1;
	until = jiffies + 10 * HZ;
	while (!atomic_read(&tm_deadlock_spinning) && time_before(jiffies, until))
		cond_resched();
	preempt_disable();
	for_each_online_cpu(cpu) {
		if (waiters[cpu]) {
			wake_up_process(waiters[cpu]);
			waiters[cpu] = NULL;
		}
	}
	preempt_enable();
out:
	for_each_online_cpu(cpu)
		if (waiters[cpu])
			kthread_stop(waiters[cpu]);  /* never woken: its function never runs */
	kfree(waiters);
	return err;
}

static int tm_start_deadlock(unsigned int cpu, bool irqs_off)
{
	struct task_struct *task;

	if (cpu >= nr_cpu_ids || !cpu_online(cpu))
		return -EINVAL;
	if (tm_deadlock_cpu >= 0)
		return -EBUSY;  /* the lock is already taken for good */
	task = kthread_create(tm_deadlock_thread, irqs_off ? (void *)1UL : NULL,
			      "tm_deadlock/%u", cpu);
	if (IS_ERR(task))
		return PTR_ERR(task);
	kthread_bind(task, cpu);
	tm_deadlock_cpu = cpu;
	tm_deadlock_irqs_off = irqs_off;
	__module_get(THIS_MODULE);  /* its code spins forever: never unload it */
	wake_up_process(task);
	return 0;
}

/* ---- (b) the hung driver -------------------------------------------------- */

static DECLARE_WAIT_QUEUE_HEAD(tm_hang_wq);
static unsigned long tm_hang_generation;  /* bumped only by "wake" */
static atomic_t tm_hang_readers = ATOMIC_INIT(0);
static atomic_long_t tm_hang_reads = ATOMIC_LONG_INIT(0);
static atomic_long_t tm_hang_writes = ATOMIC_LONG_INIT(0);
static DEFINE_MUTEX(tm_hang_data_mutex);
static char *tm_hang_data;
static size_t tm_hang_len;

static noinline ssize_t tm_hang_read(struct file *file, char __user *buf, size_t count,
				     loff_t *ppos)
{
	unsigned long generation = READ_ONCE(tm_hang_generation);
	size_t n;

	atomic_long_inc(&tm_hang_reads);
	atomic_inc(&tm_hang_readers);
	/* Sleep until data "arrives": TASK_UNINTERRUPTIBLE, and nobody wakes us. */
	wait_event(tm_hang_wq, READ_ONCE(tm_hang_generation) != generation);
	atomic_dec(&tm_hang_readers);

	mutex_lock(&tm_hang_data_mutex);
	n = min(count, tm_hang_len);
	if (n && copy_to_user(buf, tm_hang_data, n))
		n = 0;
	tm_hang_len = 0;
	mutex_unlock(&tm_hang_data_mutex);
	return n;
}

static noinline ssize_t tm_hang_write(struct file *file, const char __user *buf, size_t count,
				      loff_t *ppos)
{
	size_t n = min_t(size_t, count, TM_HANG_BUFSIZE);

	mutex_lock(&tm_hang_data_mutex);
	if (copy_from_user(tm_hang_data, buf, n)) {
		mutex_unlock(&tm_hang_data_mutex);
		return -EFAULT;
	}
	tm_hang_len = n;
	mutex_unlock(&tm_hang_data_mutex);
	atomic_long_inc(&tm_hang_writes);
	/* The bug: the data is here, but the readers are never woken. */
	return count;
}

static const struct file_operations tm_hang_fops = {
	.owner = THIS_MODULE,
	.read = tm_hang_read,
	.write = tm_hang_write,
	.llseek = noop_llseek,
};

static struct miscdevice tm_hang_device = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "tm_hang",
	.fops = &tm_hang_fops,
	.mode = 0666,
};

static void tm_hang_wake(void)
{
	WRITE_ONCE(tm_hang_generation, tm_hang_generation + 1);
	wake_up_all(&tm_hang_wq);
}

/* ---- the control file ------------------------------------------------------ */

/* Outside every lock of ours: the oops kills the calling task where it stands. */
static noinline void tm_oops(void)
{
	pr_emerg("transmigrate_faults: oops on request\n");
	BUG();
}

static int tm_control_show(struct seq_file *m, void *v)
{
	seq_printf(m, "deadlock_cpu %d\n", tm_deadlock_cpu);
	seq_printf(m, "deadlock_irqs_off %d\n", tm_deadlock_irqs_off);
	seq_printf(m, "deadlock_all %d\n", tm_deadlock_all);
	seq_printf(m, "deadlock_spinning %d\n", atomic_read(&tm_deadlock_spinning));
	seq_printf(m, "hang_readers %d\n", atomic_read(&tm_hang_readers));
	seq_printf(m, "hang_reads %ld\n", atomic_long_read(&tm_hang_reads));
	seq_printf(m, "hang_writes %ld\n", atomic_long_read(&tm_hang_writes));
	seq_printf(m, "hang_generation %lu\n", READ_ONCE(tm_hang_generation));
	return 0;
}

static int tm_control_open(struct inode *inode, struct file *file)
{
	return single_open(file, tm_control_show, NULL);
}

static ssize_t tm_control_write(struct file *file, const char __user *ubuf, size_t count,
				loff_t *ppos)
{
	char buf[64];
	char *cmd, *arg;
	unsigned int cpu;
	int err;

	if (count >= sizeof(buf))
		return -EINVAL;
	if (copy_from_user(buf, ubuf, count))
		return -EFAULT;
	buf[count] = '\0';
	arg = strim(buf);
	cmd = strsep(&arg, " \t");
	if (arg)
		arg = skip_spaces(arg);

	if (!strcmp(cmd, "oops"))
		tm_oops();

	mutex_lock(&tm_control_mutex);
	if (!strcmp(cmd, "deadlock") || !strcmp(cmd, "deadlock-irq")) {
		err = (arg && !kstrtouint(arg, 10, &cpu)) ?
			tm_start_deadlock(cpu, !strcmp(cmd, "deadlock-irq")) : -EINVAL;
	} else if (!strcmp(cmd, "deadlock-all")) {
		err = tm_start_deadlock_all();
	} else if (!strcmp(cmd, "wake")) {
		tm_hang_wake();
		err = 0;
	} else {
		err = -EINVAL;
	}
	mutex_unlock(&tm_control_mutex);
	return err ? err : count;
}

static const struct proc_ops tm_control_ops = {
	.proc_open = tm_control_open,
	.proc_read = seq_read,
	.proc_lseek = seq_lseek,
	.proc_release = single_release,
	.proc_write = tm_control_write,
};

static struct proc_dir_entry *tm_control_entry;

static int __init tm_faults_init(void)
{
	int err;

	tm_hang_data = kzalloc(TM_HANG_BUFSIZE, GFP_KERNEL);
	if (!tm_hang_data)
		return -ENOMEM;
	err = misc_register(&tm_hang_device);
	if (err)
		goto free_data;
	tm_control_entry = proc_create(TM_CONTROL, 0600, NULL, &tm_control_ops);
	if (!tm_control_entry) {
		err = -ENOMEM;
		goto deregister;
	}
	pr_info("transmigrate_faults: loaded (/proc/%s, /dev/%s)\n", TM_CONTROL,
		tm_hang_device.name);
	return 0;

deregister:
	misc_deregister(&tm_hang_device);
free_data:
	kfree(tm_hang_data);
	return err;
}

static void __exit tm_faults_exit(void)
{
	proc_remove(tm_control_entry);
	misc_deregister(&tm_hang_device);
	tm_hang_wake();
	kfree(tm_hang_data);
}

module_init(tm_faults_init);
module_exit(tm_faults_exit);

MODULE_LICENSE("GPL");
MODULE_AUTHOR("transmigrate");
MODULE_DESCRIPTION("Injects the faults transmigrate's monitor detects: a spinlock deadlock and a hung driver");
