import pytest

from hvframe.kvm import kvm_available

KVM_MISSING = kvm_available()
requires_kvm = pytest.mark.skipif(KVM_MISSING is not None, reason=f"needs KVM: {KVM_MISSING}")
