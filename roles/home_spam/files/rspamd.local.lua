--[[ YesTLS: SPF as the edge saw it.

The edge evaluates SPF at MAIL FROM while the sender is connected
(relay/edge/door.py) and seals the result with the message; home delivers it
minutes or days later, when DNS may say otherwise. So rspamd's spf module is
off (local.d/spf.conf) and this rule gives its symbols instead: the edge's
result, passed by the intake in the X-YesTLS-SPF request header, when there
is one; else SPF evaluated here, as the spf module would (rspamd_spf). DMARC
depends on these symbols by name and reads them as usual.
]]
local rspamd_spf = require "rspamd_spf"
local bit = require "bit"

local symbols = {
  pass = 'R_SPF_ALLOW', fail = 'R_SPF_FAIL', softfail = 'R_SPF_SOFTFAIL', neutral = 'R_SPF_NEUTRAL',
  none = 'R_SPF_NA', temperror = 'R_SPF_DNSFAIL', permerror = 'R_SPF_PERMFAIL',
}
local by_policy = {
  [rspamd_spf.policy.pass] = {'pass', '+'}, [rspamd_spf.policy.fail] = {'fail', '-'},
  [rspamd_spf.policy.soft_fail] = {'softfail', '~'}, [rspamd_spf.policy.neutral] = {'neutral', '?'},
}

local function by_flags(flags)
  if bit.band(flags, rspamd_spf.flags.temp_fail) ~= 0 then return 'temperror' end
  if bit.band(flags, rspamd_spf.flags.perm_fail) ~= 0 then return 'permerror' end
  return 'none'
end

-- DMARC (plugins/dmarc.lua) runs once both SPF and DKIM said they were done, counted in this variable.
local function spf_done(task)
  local pool = task:get_mempool()
  pool:set_variable('dmarc_checks', (pool:get_variable('dmarc_checks', 'double') or 0) + 1)
end

local function yestls_spf(task)
  spf_done(task)
  local claim = task:get_request_header('X-YesTLS-SPF')
  if claim then
    local result = tostring(claim)
    if symbols[result] then
      task:insert_result(symbols[result], 1.0, 'evaluated at the edge')
    end
    return
  end
  local ip = task:get_from_ip()
  if not ip or not ip:is_valid() then return end
  rspamd_spf.resolve(task, function(record, flags, err)
    if not record then
      task:insert_result(symbols[by_flags(flags)], 1.0, err or '')
      return
    end
    local matched, flag_or_policy, detail = record:check_ip(ip)
    if matched then
      local result = by_policy[flag_or_policy] or {'neutral', '?'}
      task:insert_result(symbols[result[1]], 1.0, result[2] .. ((detail and detail.str) or '?'))
    else
      task:insert_result(symbols[by_flags(flag_or_policy)], 1.0, detail)
    end
  end)
end

local id = rspamd_config:register_symbol{
  name = 'YESTLS_SPF', type = 'callback', flags = 'fine,empty', groups = {'policies', 'spf'}, score = 0.0,
  callback = yestls_spf,
}
for _, symbol in pairs(symbols) do
  rspamd_config:register_symbol{name = symbol, type = 'virtual', parent = id, groups = {'policies', 'spf'}}
end
